"""The library's input errors: what a bad config, dataset, checkpoint, backbone or run directory
raises (and a loss that turned NaN). Whoever reports them to a user, the CLI or the service's
job runner, shows the message alone: the traceback would only point at the library."""

from __future__ import annotations


def input_error_types() -> tuple[type[BaseException], ...]:
    # Imported here: loading them pulls in torch and the models, which this module must not.
    from training.checkpoint import CheckpointError
    from training.config import ConfigError
    from training.data.records import DatasetError
    from training.engine.trainer import RunDirectoryError
    from training.models.backbones import BackboneError

    return (
        BackboneError,
        CheckpointError,
        ConfigError,
        DatasetError,
        RunDirectoryError,
        FloatingPointError,
    )
