"""Errors in OpenAI's shape, and the one place item error codes become HTTP statuses.

Every error a client or worker sees is ``{"error": {"message", "type", "param", "code"}}``
(OpenAI API reference, "Error codes"). Handlers raise :class:`APIError`; :func:`install`
renders it, and turns FastAPI's request validation errors into the same shape (400).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from common.protocol import CLIENT_ERRORS, ItemError
from gateway.api.models import ErrorBody, ErrorResponse
from gateway.queue.store import StoreUnavailable

#: Characters of an error message at most (a message may quote what a client sent).
MAX_MESSAGE = 1024


class APIError(Exception):
    """An error response: HTTP ``status`` with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        # A message may quote client text: lone surrogates (valid JSON, not Unicode) are
        # escaped so that the error can always be rendered.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.body = ErrorBody(message=message, type=type, param=param, code=code)

    def response_json(self) -> dict[str, Any]:
        return ErrorResponse(error=self.body).model_dump()


def item_error(error: ItemError, field: str, index: int, inputs: int) -> APIError:
    """The client's answer for a request one of whose inputs failed: 400 for the codes in
    :data:`~common.protocol.CLIENT_ERRORS` (``param`` names the field), 500 for the others
    (``internal_error``, ``max_attempts_exceeded``). With several inputs the message starts
    with ``<field>[<index>]: ``."""
    client_fault = error.code in CLIENT_ERRORS
    prefix = f"{field}[{index}]: " if inputs > 1 else ""
    return APIError(
        400 if client_fault else 500,
        prefix + error.message,
        type="invalid_request_error" if client_fault else "server_error",
        param=field if client_fault else None,
        code=error.code.value,
    )


def error_response(exc: Exception) -> JSONResponse | None:
    """The response for an :class:`APIError` or an unreachable queue store
    (:class:`~gateway.queue.store.StoreUnavailable`: 503, ``queue_unavailable``); ``None`` for
    any other exception."""
    if isinstance(exc, StoreUnavailable):
        # What failed (host, port, errno) goes to the log (the store logs it once per
        # outage), not to clients.
        exc = APIError(
            503,
            "The queue store is unavailable; try again shortly.",
            type="server_error",
            code="queue_unavailable",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, APIError):
        return JSONResponse(exc.response_json(), status_code=exc.status, headers=exc.headers)
    return None


async def _known_error(_: Request, exc: Exception) -> JSONResponse:
    response = error_response(exc)
    assert response is not None
    return response


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"Invalid URL ({request.method} {request.url.path[:200]})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path[:200]}"
    else:
        message = str(exc.detail)
    err = APIError(
        exc.status_code,
        message,
        type="invalid_request_error" if exc.status_code < 500 else "server_error",
        headers=dict(exc.headers) if exc.headers else None,
    )
    return JSONResponse(err.response_json(), status_code=err.status, headers=err.headers)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    """A bug or an unexpected store error: a plain 500 in OpenAI's shape, no internals (the
    server logs the traceback: Starlette raises the exception on after this answer)."""
    err = APIError(500, "The server had an error processing the request.", type="server_error")
    return JSONResponse(err.response_json(), status_code=500)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    err = invalid_body(exc.errors()[0], exc.body)
    return JSONResponse(err.response_json(), status_code=400)


def invalid_body(err: Any, body: Any = None) -> APIError:
    """The 400 for a request body that does not validate (``err``: pydantic's first error;
    ``body``: FastAPI's ``RequestValidationError.body``, the text where it is not JSON). A body
    that is not JSON at all (pydantic's or FastAPI's ``json_invalid``) is answered in
    :func:`invalid_json`'s words, whichever parser found it."""
    if err.get("type") == "json_invalid":
        return _from_json_invalid(err, body)
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # pydantic reports union members as extra path parts; keep the field name.
    param = loc[0] if loc else None
    if param == "input":
        msg = (
            "'input' must be a non-empty string, an array of strings, an array of token "
            "ids, an array of token-id arrays, or objects with a 'prompt_template'"
        )
    elif err.get("type") == "missing":
        msg = f"'{param}' is a required property"
    elif err.get("type") == "string_unicode":  # a lone surrogate: valid JSON, not Unicode
        msg = f"'{param}' is not valid Unicode: a lone surrogate."
    else:
        msg = f"Invalid value for '{'.'.join(loc) or 'body'}': {err.get('msg')}"
    return APIError(400, msg, param=param)


def invalid_json(error: ValueError | RecursionError) -> APIError:
    """The 400 for a request body that is not JSON (``error``: what ``json.loads`` raised)."""
    where = ""
    if isinstance(error, json.JSONDecodeError):
        where = f": {error.msg} at line {error.lineno}, column {error.colno}"
    elif isinstance(error, RecursionError):
        where = ": it is nested too deeply"
    return _not_valid_json(where)


def _not_valid_json(where: str) -> APIError:
    return APIError(400, f"The request body is not valid JSON{where}.")


def _from_json_invalid(err: Any, body: Any) -> APIError:
    """:func:`invalid_json` from a ``json_invalid`` error: FastAPI's carries ``json.loads``'s
    message, the offset as the last part of ``loc`` and the text as ``body``; pydantic-core's
    carries its message with the line and column."""
    detail = str((err.get("ctx") or {}).get("error") or "").strip()
    loc = err.get("loc") or ()
    offset = loc[-1] if loc else None
    if isinstance(body, str) and isinstance(offset, int) and detail:
        return invalid_json(json.JSONDecodeError(detail, body, offset))
    return _not_valid_json(f": {detail}" if detail else "")


def install(app: FastAPI) -> None:
    """Render :class:`APIError`, request validation errors (400), Starlette's own HTTP errors
    (unknown route 404, a body that cannot be parsed 400), an unreachable queue store (503,
    ``queue_unavailable``) and any other exception (500, logged) in OpenAI's shape."""
    app.add_exception_handler(APIError, _known_error)
    app.add_exception_handler(StoreUnavailable, _known_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
