"""Exception classes shared by every layer.

Each error carries the HTTP status it maps to, so the API modules translate
an exception into their own wire format without guessing, and the CLI prints
its message as one line.
"""

from __future__ import annotations


class MullamaError(Exception):
    """Base class of every error Mullama raises on purpose."""

    status: int = 500
    #: A short machine-readable kind, used by the OpenAI and Anthropic error bodies.
    kind: str = "server_error"
    #: Whole seconds a client should wait before trying again (sent as ``Retry-After``); None when retrying won't help.
    retry_after: int | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequestError(MullamaError):
    """The request (or a file, name or option given by the user) is invalid."""

    status = 400
    kind = "invalid_request_error"


class UnauthorizedError(MullamaError):
    """A missing or wrong API key."""

    status = 401
    kind = "authentication_error"


class ForbiddenError(MullamaError):
    """The request is understood but not allowed (for example a foreign Host header)."""

    status = 403
    kind = "permission_error"


class NotFoundError(MullamaError):
    """Something named by the request does not exist."""

    status = 404
    kind = "not_found_error"


class ModelNotFoundError(NotFoundError):
    """A model name that is not in the store."""

    def __init__(self, name: str) -> None:
        super().__init__(f'model "{name}" not found, try pulling it first', param="model")
        self.name = name


class PayloadTooLargeError(MullamaError):
    """A request body above the configured limit."""

    status = 413
    kind = "request_too_large"


class TooManyRequestsError(MullamaError):
    """A rate limit or a model's limit was reached; ``retry_after`` is the whole seconds to wait (``Retry-After``)."""

    status = 429
    kind = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = max(1, retry_after)


class OverloadedError(MullamaError):
    """The queue is full or the server is shutting down."""

    status = 503
    kind = "overloaded_error"


class CancelledError(MullamaError):
    """A generation was cancelled by the caller or by the server."""

    status = 499
    kind = "cancelled"


class InvalidModelFileError(BadRequestError):
    """A GGUF file that is truncated, corrupt or hostile."""


class NativeLibraryError(MullamaError):
    """libllama could not be found, loaded or used."""

    kind = "native_library_error"


class ModelLoadError(MullamaError):
    """llama.cpp refused to load a model or to create its context."""

    kind = "model_load_error"


class StorageFullError(MullamaError):
    """The disk that holds the store has no room for what was asked; nothing half-written was kept."""

    status = 507
    kind = "storage_full"


class RpcWorkerError(MullamaError):
    """An RPC worker holding part of a model stopped answering; the model was unloaded."""

    status = 502
    kind = "rpc_worker_error"


class DownloadError(MullamaError):
    """A pull failed: network, authentication, or bytes that do not match their hash."""

    status = 502
    kind = "download_error"
