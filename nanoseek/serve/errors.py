"""HTTP errors of the API: one exception type, the OpenAI error body, and the status table.

Owns:
  * `ApiError`: status + OpenAI error fields (+ headers), with one constructor per row of DeepSeek's table
    (400 invalid format, 401 authentication, 402 insufficient balance, 422 invalid parameters, 429 rate limit,
    500 server error, 503 overloaded) plus 404 and the context-length 400.
  * `error_response(err) -> (status, headers, body)`: any exception → what to send. The server's exception
    handlers call it; so does a stream that fails midway (send `data: <body>` — the OpenAI SDK raises on an
    `error` key inside a stream).
  * `ErrorResponse`: the body as a pydantic model, for the OpenAPI spec.

Body shape (OpenAI's, which DeepSeek also uses): {"error": {"message", "type", "param", "code"}}. The
Anthropic Messages routes (serve/anthropic.py; `dialect_of(path)` says which paths) get Anthropic's shape
instead, {"type": "error", "error": {"type", "message"}}, with Anthropic's type names and its statuses
(a schema error is a 400 there, and an over-long prompt says "prompt is too long", which agent clients match
on to compact their history).

400 or 422 — decided by what the DeepSeek API of the R1 era actually answered, which is also where every
other server agrees:
  * 422: the body is JSON but does not fit the schema — a wrong type, a missing required field, an unknown
    role. DeepSeek's serde layer answered these with 422 "Failed to deserialize the JSON body into the target
    type: …" (reported by clients in Sept 2024 – Mar 2025, e.g. cline#230, chatbox#1740, ProxyAI#907).
  * 400: everything else the client got wrong — a body that is not JSON at all, a value out of range
    (DeepSeek: 400 "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]"; OpenAI and vLLM
    are 400 too), a parameter nanoseek doesn't support, a prompt that doesn't fit the context.
  Reading DeepSeek's docs table literally ("422 Invalid Parameters") would send out-of-range values to 422,
  which no real server does. `SCHEMA_STATUS` is the one place to change if that decision is revisited.

Server wiring (FastAPI), for every one of these exception types:
    for exc_type in (ApiError, RequestValidationError, NanoseekError, StarletteHTTPException, Exception):
        @app.exception_handler(exc_type)
        async def handle(request, exc):
            status, headers, body = error_response(exc)
            return JSONResponse(body, status_code=status, headers=headers)
Log the traceback of anything that maps to 500: the body deliberately says nothing about it. A bare pydantic
ValidationError is one of those: parse request bodies with `Model.parse` / `Model.parse_json` (or let FastAPI
do it), so that only the server's own objects can raise it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from nanoseek.engine.sampling import (
    json_kind,  # OpenAI's JSON type words; shared so both layers say "a string"
)
from nanoseek.errors import (
    BadInputError,
    InsufficientBalanceError,
    NanoseekError,
    NotFoundError,
    QueueFullError,
    QuotaExceededError,
    UnsupportedError,
)

SCHEMA_STATUS = 422   # a body that doesn't fit the schema (see the module docstring)

# OpenAI `type` per status. 401/402/429/503 follow DeepSeek's and OpenAI's published names.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
          403: "permission_error", 404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable_error"}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every non-2xx body, and the payload of a failed stream's last `data:` event."""

    error: ErrorInfo


class ApiError(Exception):
    """An error the client should see, with its HTTP status. Raise it anywhere in request handling."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.lengths: tuple[int, int] | None = None   # (prompt tokens, context) of a context_length_exceeded

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, param={self.param!r}, code={self.code!r})"

    # -- DeepSeek's table ---------------------------------------------------------------------------------

    @classmethod
    def bad_request(cls, message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
        """400: a request nanoseek can read but won't run as asked (bad value, contradictory fields)."""
        return cls(400, message, param=param, code=code)

    @classmethod
    def unsupported(cls, param: str, why: str | None = None) -> ApiError:
        """400 for a real OpenAI/DeepSeek/vLLM parameter that nanoseek cannot honour. Never ignore those:
        the client would get an answer that silently isn't what it asked for."""
        message = f"Unsupported parameter: '{param}' is not supported by nanoseek"
        return cls(400, f"{message} ({why})." if why else f"{message}.", param=param, code="unsupported_parameter")

    @classmethod
    def invalid_schema(cls, message: str, param: str | None = None, code: str | None = "invalid_type") -> ApiError:
        """SCHEMA_STATUS (422): JSON that doesn't fit the request schema."""
        return cls(SCHEMA_STATUS, message, param=param, code=code)

    @classmethod
    def context_length_exceeded(cls, prompt_tokens: int, max_model_len: int, param: str = "messages") -> ApiError:
        """400: the prompt leaves no room for even one generated token."""
        err = cls(400, f"The prompt is {prompt_tokens} tokens long, but this model's context length is "
                        f"{max_model_len} tokens, and at least one token must remain for the completion. "
                        f"Shorten the {param}.", param=param, code="context_length_exceeded")
        err.lengths = (prompt_tokens, max_model_len)
        return err

    @classmethod
    def authentication(cls, message: str = "Authentication failed: the API key is missing or invalid.") -> ApiError:
        return cls(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @classmethod
    def insufficient_balance(cls, message: str = "Insufficient balance.") -> ApiError:
        return cls(402, message, code="insufficient_balance")

    @classmethod
    def not_found(cls, message: str, param: str | None = None, code: str | None = "not_found") -> ApiError:
        """404 — not in DeepSeek's table, but an unknown model or route needs it; OpenAI and vLLM use 404."""
        return cls(404, message, param=param, code=code)

    @classmethod
    def model_not_found(cls, model: str) -> ApiError:
        return cls.not_found(f"The model '{model}' does not exist on this server; GET /v1/models lists the ones "
                             "it serves.", param="model", code="model_not_found")

    @classmethod
    def rate_limited(cls, retry_after_s: float, message: str | None = None) -> ApiError:
        """429 with Retry-After (whole seconds, rounded up) and retry-after-ms, which the OpenAI SDK prefers."""
        return cls(429, message or f"Too many requests; retry after {_ceil(retry_after_s)} s.",
                   code="rate_limit_exceeded", headers=_retry_headers(retry_after_s))

    @classmethod
    def server_error(cls, message: str = "The server had an internal error while processing the request.") -> ApiError:
        return cls(500, message)

    @classmethod
    def overloaded(cls, retry_after_s: float | None = None,
                   message: str = "The server is overloaded; retry after a brief wait.") -> ApiError:
        return cls(503, message, code="server_is_overloaded",
                   headers=_retry_headers(retry_after_s) if retry_after_s is not None else None)


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _retry_headers(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(_ceil(seconds)), "retry-after-ms": str(max(0, round(seconds * 1000)))}


# ---------------------------------------------------------------------------------------------------------
# Other exception kinds → ApiError


# SamplingParams.validate and friends put the parameter first, in quotes: "Invalid 'top_p': …",
# "Invalid type for 'stop[0]': …". That is the `param` of the error body.
_PARAM_IN_MESSAGE = re.compile(r"^Invalid (?:type for |value for )?'([^']+)'")


def from_nanoseek(err: NanoseekError) -> ApiError:
    """A NanoseekError raised while handling a request: bad input 400, unsupported 400, not found 404,
    insufficient balance 402, storage quota full 413, full request queue 503."""
    message = str(err)
    param = getattr(err, "param", None)
    if param is None and (m := _PARAM_IN_MESSAGE.match(message)):
        param = m.group(1)
    if isinstance(err, QueueFullError):
        return ApiError.overloaded(message=message)
    if isinstance(err, InsufficientBalanceError):
        return ApiError.insufficient_balance(message)
    if isinstance(err, QuotaExceededError):
        # 413, not 429: waiting frees nothing (only deleting does), and SDKs retry 429s on their own.
        return ApiError(413, message, param=param, code="storage_quota_exceeded")
    if isinstance(err, NotFoundError):
        return ApiError.not_found(message, param=param)
    if isinstance(err, UnsupportedError):
        return ApiError(400, message, param=param, code="unsupported_parameter")
    if isinstance(err, BadInputError):
        code = "invalid_type" if message.startswith("Invalid type") else "invalid_value"
        return ApiError.bad_request(message, param=param, code=code)
    return ApiError.bad_request(message, param=param, code=None)


def from_validation_errors(errors: list[dict]) -> ApiError:
    """pydantic's `.errors()` (also FastAPI's RequestValidationError, whose locations start with "body") →
    one ApiError about the first problem, worded the way OpenAI words it."""
    if not errors:
        return ApiError.invalid_schema("The request body does not match the schema.", code=None)
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError.bad_request(f"The request body is not valid JSON ({first.get('msg', '')}).", code="invalid_json")
    return _describe(_strip_body(errors))


def _strip_body(errors: list[dict]) -> list[dict]:
    out = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        out.append({**e, "loc": loc[1:] if loc[:1] == ("body",) else loc})
    return out


# Labels pydantic puts into error locations for union members: "str", "list[int]", "function-after[…]", and
# the tag of a discriminated union (the message role), which always follows a list index.
_BARE_LABELS = {"str", "int", "float", "bool", "bytes", "none"}
ROLE_TAGS = ("system", "developer", "user", "assistant", "tool")


def _is_label(loc: tuple, i: int) -> bool:
    seg = loc[i]
    if not isinstance(seg, str):
        return False
    if "[" in seg or seg in _BARE_LABELS:
        return True
    return seg in ROLE_TAGS and i > 0 and isinstance(loc[i - 1], int) and i + 1 < len(loc)


def _is_role_tag(loc: tuple, i: int) -> bool:
    return _is_label(loc, i) and loc[i] in ROLE_TAGS


def _first_union_label(loc: tuple) -> int | None:
    """Index of the first label of a plain union (not a role tag: a tagged union tries only one member)."""
    return next((i for i in range(len(loc)) if _is_label(loc, i) and not _is_role_tag(loc, i)), None)


def _param(loc: tuple) -> str | None:
    """('messages', 0, 'content') → "messages[0].content", skipping union labels."""
    out = ""
    for i, seg in enumerate(loc):
        if _is_label(loc, i):
            continue
        out += f"[{seg}]" if isinstance(seg, int) else (f".{seg}" if out else str(seg))
    return out or None


# What a union member expects, in OpenAI's words.
_LABEL_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
                "list[str]": "an array of strings", "list[int]": "an array of token ids",
                "list[list[int]]": "an array of token-id arrays", "list[TextPart]": "an array of text parts"}

_TYPE_WORDS = {"string_type": "a string", "int_type": "an integer", "int_from_float": "an integer",
               "float_type": "a number", "bool_type": "a boolean", "list_type": "an array",
               "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
               "none_required": "null"}


def _describe(errors: list[dict]) -> ApiError:
    first = errors[0]
    loc = first["loc"]
    p = _first_union_label(loc)
    if p is not None:
        # A union (e.g. `stop`: string | array). If exactly one member got past its outer type check, the
        # value was meant as that member: report its inner error. Otherwise name the union as a whole.
        prefix = loc[:p]
        here = [e for e in errors if e["loc"][:p] == prefix and len(e["loc"]) > p and _is_label(e["loc"], p)]
        deep = {e["loc"][p] for e in here if len(e["loc"]) > p + 1}
        if len(deep) == 1:
            label = deep.pop()
            inner = [{**e, "loc": e["loc"][:p] + e["loc"][p + 1:]} for e in here if e["loc"][p] == label]
            return _describe(inner)
        labels = list(dict.fromkeys(e["loc"][p] for e in here))
        expected = _or([_LABEL_WORDS.get(lb, "an array" if lb.startswith("list[") else lb) for lb in labels])
        shallow = [e for e in here if len(e["loc"]) == p + 1]
        got = f", but got {json_kind(shallow[0]['input'])} instead" if shallow and "input" in shallow[0] else ""
        return ApiError.invalid_schema(f"Invalid type for '{_param(prefix)}': expected {expected}{got}.",
                                       param=_param(prefix))
    param = _param(loc)
    where = f"'{param}'" if param else "the request body"   # FastAPI reports the body itself at ("body",)
    kind, ctx = first.get("type", ""), first.get("ctx") or {}
    if kind == "missing":
        message = f"Missing required parameter: {where}." if param else "The request body is missing."
        return ApiError.invalid_schema(message, param=param, code="missing_required_parameter")
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        field = ctx.get("discriminator", "'role'").strip("'")
        param = f"{param}.{field}" if param else field
        if kind == "union_tag_not_found":
            return ApiError.invalid_schema(f"Missing required parameter: '{param}'.", param=param,
                                           code="missing_required_parameter")
        return ApiError.invalid_schema(f"Invalid value for '{param}': expected one of {ctx.get('expected_tags')}, "
                                       f"but got '{ctx.get('tag')}' instead.", param=param, code="invalid_value")
    if kind == "literal_error":
        return ApiError.invalid_schema(f"Invalid value for {where}: expected {ctx.get('expected')}, but got "
                                       f"{json.dumps(first.get('input'))} instead.", param=param, code="invalid_value")
    if kind == "extra_forbidden":
        return ApiError.invalid_schema(f"Unrecognized parameter: {where}.", param=param, code="unknown_parameter")
    if kind in _TYPE_WORDS:
        return ApiError.invalid_schema(f"Invalid type for {where}: expected {_TYPE_WORDS[kind]}, but got "
                                       f"{json_kind(first.get('input'))} instead.", param=param)
    return ApiError.invalid_schema(f"Invalid {where}: {first.get('msg', 'invalid value')}.", param=param,
                                   code="invalid_value")


def _or(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# ---------------------------------------------------------------------------------------------------------
# The one function the server calls


def json_object(raw: bytes) -> dict:
    """A request body decoded as a JSON object: not JSON is a 400, another JSON value a 422 (the API's rules)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError.bad_request(f"The request body is not valid JSON ({e}).", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError.invalid_schema("The request body must be a JSON object.")
    return data


def to_api_error(err: BaseException) -> ApiError:
    """Any exception → the ApiError the client should see (500 for anything not recognised)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, NanoseekError):
        return from_nanoseek(err)
    if isinstance(err, json.JSONDecodeError):
        return ApiError.bad_request(f"The request body is not valid JSON ({err.msg}).", code="invalid_json")
    if isinstance(err, ValidationError):
        # Request bodies reach here only as ApiError (Model.parse) or as FastAPI's RequestValidationError,
        # which is not this class. A bare one means the server built an inconsistent object (a Usage whose
        # counts don't add up, say): the server's fault, not the client's.
        return ApiError.server_error()
    errors = getattr(err, "errors", None)
    if callable(errors):             # FastAPI's RequestValidationError
        try:
            return from_validation_errors(list(errors()))
        except TypeError:            # some other `.errors` with a different signature: not ours
            pass
    status, detail = getattr(err, "status_code", None), getattr(err, "detail", None)
    if isinstance(status, int) and 400 <= status < 600:   # Starlette/FastAPI HTTPException (404 route, 405 …)
        return ApiError(status, detail if isinstance(detail, str) else f"HTTP {status}.",
                        headers=getattr(err, "headers", None))
    return ApiError.server_error()


OPENAI, ANTHROPIC = "openai", "anthropic"
ANTHROPIC_PATHS = ("/anthropic/", "/v1/messages")   # serve/app.py mounts the Messages API under these


def dialect_of(path: str) -> str:
    """Which error body a request path gets: Anthropic's on the Messages API, OpenAI's everywhere else."""
    return ANTHROPIC if path.startswith(ANTHROPIC_PATHS) else OPENAI


# Anthropic's error `type` per status (docs.anthropic.com "Errors"); 402 is its billing_error.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(api: ApiError) -> tuple[int, dict[str, Any]]:
    """(status, body) of `api` in Anthropic's dialect. A schema error (422 here) is a 400 there."""
    status = 400 if api.status == SCHEMA_STATUS else api.status
    message = api.message
    if api.code == "context_length_exceeded":
        # Anthropic's wording, which Claude Code and other agents look for before compacting a conversation
        message = (f"prompt is too long: {api.lengths[0]} tokens > {api.lengths[1] - 1} maximum"
                   if api.lengths else f"prompt is too long: {message}")
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def error_response(err: BaseException, dialect: str = OPENAI) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, body) for `err`, ready for JSONResponse(body, status_code=status, headers=headers)."""
    api = to_api_error(err)
    if dialect == ANTHROPIC:
        status, body = anthropic_error(api)
        return status, dict(api.headers), body
    return api.status, dict(api.headers), api.body()
