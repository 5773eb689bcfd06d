"""Errors as the client sees them: OpenAI-style objects with the HTTP status that fits (see docs/serving.md)."""

from __future__ import annotations

from typing import Any

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error the client gets as an OpenAI-style object: the HTTP status, a message naming the bad value and what
    is allowed, and the request field (`param`) it concerns."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
