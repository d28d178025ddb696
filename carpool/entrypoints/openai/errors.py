"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise APIError; everything the client did wrong becomes a 4xx with a message that names the
field, and anything else is logged and answered with a generic 500 that echoes nothing.
"""

from __future__ import annotations

import re
from http import HTTPStatus

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from carpool.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 408: "RequestTimeoutError", 413: "RequestTooLargeError",
                415: "UnsupportedMediaTypeError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
# A 503 (overloaded, shutting down, engine down) tells clients when to try again: the SDKs honour it.
RETRY_AFTER_S = 1
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): ")
# pydantic names union branches in error locations ("str", "list[int]"); they are not fields.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    kind = _ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status))


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(error_body(status, message, param).model_dump(), status_code=status, headers=headers)


def bad_request_from_value_error(e: ValueError) -> APIError:
    """SamplingParams and the Engine start every message with the field's name: that is `param`."""
    message = str(e)
    match = _FIELD_PREFIX.match(message)
    return APIError(400, message, match.group(1) if match else None)


def bad_request_from_validation_error(e: ValidationError) -> APIError:
    first = e.errors(include_url=False)[0]
    path: list[str] = []
    for part in first["loc"]:
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part):
            break
        path.append(str(part))
    where = ".".join(path)
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return APIError(400, message, path[0] if path else None)
