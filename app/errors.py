"""The service's error vocabulary: each failure a client can cause has a status and a code.

Inference and decoding code raise these; the API layer turns them into the JSON body
`{"error": {"code": ..., "message": ...}}` of the contract.
"""

from __future__ import annotations


class ServiceError(Exception):
    status_code: int = 500
    code: str = "internal_error"
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidImage(ServiceError):
    status_code = 400
    code = "invalid_image"


class InvalidEmbedding(ServiceError):
    status_code = 400
    code = "invalid_embedding"


class InvalidBase64(ServiceError):
    status_code = 400
    code = "invalid_base64"


class InvalidRequest(ServiceError):
    status_code = 400
    code = "invalid_request"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"


class ValidationFailed(ServiceError):
    status_code = 422
    code = "validation_error"


class Overloaded(ServiceError):
    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class ShuttingDown(ServiceError):
    status_code = 503
    code = "shutting_down"
    headers = {"Retry-After": "5"}


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"
    headers = {"Retry-After": "5"}


class RequestTimedOut(ServiceError):
    status_code = 504
    code = "timeout"


class ClientDisconnected(ServiceError):
    """The client went away; nobody reads this answer (499, as nginx logs it)."""

    status_code = 499
    code = "client_disconnected"


class InferenceFailed(ServiceError):
    """A real fault on our side; the message never carries internals."""

    status_code = 500
    code = "inference_failed"


def at_item(error: ServiceError, location: str) -> ServiceError:
    """The same error, its message prefixed with the item it concerns (e.g. `images[3]`)."""
    located = type(error).__new__(type(error))
    located.__dict__.update(error.__dict__)
    located.message = f"{location}: {error.message}"
    located.args = (located.message,)
    return located
