"""Error kinds that cross module boundaries.

The CLI turns a NanoseekError into one line and a non-zero exit; the server will turn it into an
OpenAI-shaped 4xx body. Anything else escaping is a bug and keeps its traceback.
"""


class NanoseekError(Exception):
    """Base class: a problem the user can act on. `str(err)` is the whole message."""

    exit_code = 1


class NotFoundError(NanoseekError):
    """A path, model name or file that does not exist."""

    exit_code = 2


class BadInputError(NanoseekError):
    """Input that exists but is malformed: truncated file, contradictory config, bad argument."""

    exit_code = 3


class UnsupportedError(NanoseekError):
    """Well-formed input that nanoseek does not handle (architecture, quant type, option)."""

    exit_code = 4


class QueueFullError(NanoseekError):
    """The server's bounded request queue is full: try again shortly (HTTP 503)."""

    exit_code = 5


class InsufficientBalanceError(NanoseekError):
    """A key's remaining budget cannot cover even the smallest run of a request (HTTP 402)."""

    exit_code = 6


class QuotaExceededError(NanoseekError):
    """A per-key storage quota is full; retrying will not help until something is deleted (HTTP 413)."""

    exit_code = 7
