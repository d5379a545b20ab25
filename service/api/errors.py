"""Error responses that can always be encoded.

A 422 echoes the offending input, and input can hold what strict JSON cannot (NaN, Infinity: Python's json
module parses them) or what UTF-8 cannot (a lone UTF-16 surrogate from a ``\\ud800`` escape). Starlette's
JSONResponse refuses both, which turned a bad request into a 500. Every error body goes through
:func:`json_safe` first, and echoed input is kept short (a 30 MB batch is not sent back).
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

# Echoed input past this many characters (as JSON) is replaced by a note saying how long it was.
MAX_ECHOED_INPUT_CHARS = 512


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as the strings "NaN", "Infinity", "-Infinity" (the API's encoding
    of them, schemas.ORM) and lone surrogates as ``\\udXXX`` escapes, so strict UTF-8 JSON can carry it."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class SafeJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(
            json_safe(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")


def _short_input(value: Any) -> Any:
    encoded = json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False, default=str)
    if len(encoded) <= MAX_ECHOED_INPUT_CHARS:
        return value
    return f"(not echoed: {len(encoded):,} characters as JSON)"


async def request_validation_error(_: Request, exc: RequestValidationError) -> SafeJSONResponse:
    errors = []
    for error in exc.errors():
        error = dict(error)
        if "input" in error:
            error["input"] = _short_input(error["input"])
        errors.append(error)
    return SafeJSONResponse(
        {"detail": jsonable_encoder(errors)}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
    )
