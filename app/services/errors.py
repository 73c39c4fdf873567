"""Errors the services raise for bad requests; the API maps each to its status code with
`{"detail": message}`, a worker records the message on its job."""

from __future__ import annotations

# Seconds a client told to come back (503, `Retry-After`) should wait.
RETRY_AFTER_S = 5


class ServiceError(Exception):
    """A request the service refuses; `message` says what is wrong and what to do."""

    status_code = 400

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Invalid(ServiceError):
    status_code = 422


class TooLarge(ServiceError):
    status_code = 413
