"""Rules every value a client sends obeys, checked once for all routes and the same on both
databases (docs/service.md, "Input rules"): no NUL character in any text (PostgreSQL cannot
store one, so a stored NUL on SQLite would be a row the other database refuses), integers in
the signed 64-bit range (SQLite's integers; larger ones overflow its driver), and numbers
finite (JSON columns refuse NaN and infinities). File contents are not text: they are not
checked here."""

from __future__ import annotations

import json
import math
from contextlib import suppress
from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def problem(value: Any, where: str) -> str | None:
    """What breaks a rule in `value` (JSON-like, walked recursively), or None."""
    if isinstance(value, str):
        return (
            f"{where}: contains a NUL character, which no text may hold"
            if "\x00" in value
            else None
        )
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            return f"{where}: {value} is outside the 64-bit integer range"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where}: numbers must be finite"
    if isinstance(value, dict):
        for key, item in value.items():
            found = problem(key, f"{where} key") or problem(item, f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = problem(item, f"{where}[{index}]")
            if found:
                return found
    return None


def check(value: Any, where: str) -> None:
    """Raise ValueError naming the first value that breaks a rule."""
    found = problem(value, where)
    if found:
        raise ValueError(found)


async def check_request_values(request: Request) -> None:
    """A router dependency: path and query parameters, the JSON body and the form's text fields
    (FastAPI has parsed and cached the body by now). 422 on the first value that breaks a
    rule, before the route does anything."""
    pairs = [(f"path parameter {k}", v) for k, v in request.path_params.items()]
    pairs += [(f"query parameter {k}", v) for k, v in request.query_params.multi_items()]
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith("application/") and (
        content_type == "application/json" or content_type.endswith("+json")
    ):  # every type FastAPI parses as JSON
        # A malformed or absurdly nested body: FastAPI answers it (400) on routes that take one.
        with suppress(ValueError, RecursionError):
            pairs.append(("body", json.loads(await request.body() or b"null")))
    elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form()
        pairs += [
            (f"form field {k}", v) for k, v in form.multi_items() if not isinstance(v, UploadFile)
        ]
    try:
        found = next((p for where, value in pairs if (p := problem(value, where))), None)
    except RecursionError:
        found = "body: nested too deeply"
    if found:
        raise HTTPException(422, found)
