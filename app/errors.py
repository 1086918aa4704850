"""The service's error vocabulary: each failure a client can cause has a stable code.

Inference and decoding code raise these; they say what went wrong, never how it travels.
The API layer (app/api/errors.py) maps each kind to an HTTP status and turns it into the
JSON body `{"error": {"code": ..., "message": ...}}` of the contract.
"""

from __future__ import annotations


class ServiceError(Exception):
    code: str = "internal_error"
    # Seconds after which the same request may succeed; None when retrying cannot help.
    retry_after_s: int | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidImage(ServiceError):
    code = "invalid_image"


class InvalidEmbedding(ServiceError):
    code = "invalid_embedding"


class InvalidBase64(ServiceError):
    code = "invalid_base64"


class InvalidRequest(ServiceError):
    code = "invalid_request"


class PayloadTooLarge(ServiceError):
    """Bytes, pixels or images over a configured limit: the request must shrink."""

    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


class ValidationFailed(ServiceError):
    code = "validation_error"


class Unauthorized(ServiceError):
    code = "unauthorized"


class Overloaded(ServiceError):
    """Refused at admission: the service holds as much work as it may; retry shortly."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(ServiceError):
    code = "shutting_down"
    retry_after_s = 5


class NotReady(ServiceError):
    code = "not_ready"
    retry_after_s = 5


class RequestTimedOut(ServiceError):
    code = "timeout"


class ClientDisconnected(ServiceError):
    """The client went away; nobody reads this answer."""

    code = "client_disconnected"


class InferenceFailed(ServiceError):
    """A real fault on our side; the message never carries internals."""

    code = "inference_failed"


def at_item(error: ServiceError, location: str) -> ServiceError:
    """The same error, its message prefixed with the item it concerns (e.g. `images[3]`)."""
    located = type(error).__new__(type(error))
    located.__dict__.update(error.__dict__)
    located.message = f"{location}: {error.message}"
    located.args = (located.message,)
    return located
