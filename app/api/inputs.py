"""Images in: multipart file parts or JSON base64, under the byte and count limits.

FastAPI cannot declare one body that is either multipart or JSON, so routes take the raw
request and call `read_images`; the OpenAPI schema for both forms comes from
`image_request_body`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import DEFAULT_MAX_HEADER_COUNT, DEFAULT_MAX_HEADER_SIZE
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from app.api.errors import EMPTY_JSON_BODY, describe_validation_errors, shown
from app.api.media_types import MULTIPART, BodyMediaTypes, is_json, request_media_type
from app.api.multipart_framing import MultipartFraming
from app.api.strict import (
    NESTED_TOO_DEEPLY,
    DuplicateKey,
    loads_unique,
    not_json_message,
    refuse_unknown_query_parameters,
)
from app.codec import Base64Error, decode_base64
from app.config import Settings
from app.errors import (
    InvalidBase64,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)

_TRUE = {"1", "true", "yes", "on"}
_QUERY_PARAMETERS = {"dtype"}  # what the image routes take in the URL
_FALSE = {"0", "false", "no", "off"}


@dataclass
class ImageInput:
    images: list[bytes]
    locations: list[str]  # `image`, `images[3]`: how error messages name each one
    options: dict[str, Any] = field(default_factory=dict)


async def read_images(
    request: Request,
    settings: Settings,
    *,
    field_name: str,
    many: bool,
    json_model: type[BaseModel],
    options: dict[str, type] | None = None,
) -> ImageInput:
    """Parse /embed-style input. `field_name` is `image` or `images`; `options` are the
    extra scalar fields the endpoint takes (name -> bool/int/str)."""
    options = options or {}
    fields = "".join(f", `{name}`" for name in options)
    refuse_unknown_query_parameters(request, _QUERY_PARAMETERS, f"`{field_name}`{fields}")
    media_type = request_media_type(request)
    if is_json(media_type):
        body = await request.body()  # size and time limits: BodyLimitMiddleware
        return _from_json(body, settings, field_name, many, json_model)
    if media_type == MULTIPART:
        return await _from_multipart(request, settings, field_name, many, options)
    refusal = BodyMediaTypes(field_name, tuple(options)).refusal(media_type)
    raise UnsupportedMediaType(refusal or f"content type {shown(media_type)} is not taken here")


def _unparsed_multipart_message(exc: BaseException, reason: str, field_name: str) -> str:
    """What to fix in a multipart body the parser refused. Starlette reports every
    fault of the body as "Invalid multipart data"; the parser's own error, which says
    where and what, is further down the exception's causes."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, MultipartParseError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and str(cause) == "Maximum header size exceeded":
        return (
            f"a part's header line is over {DEFAULT_MAX_HEADER_SIZE} bytes, the multipart "
            "parser's limit; shorten it (a filename of a few hundred characters at most)"
        )
    if cause is not None and str(cause) == "Maximum header count exceeded":
        return (
            f"a part has over {DEFAULT_MAX_HEADER_COUNT} headers, the multipart parser's "
            "limit; send Content-Disposition and Content-Type only"
        )
    fault = str(cause) if cause is not None else reason
    return (
        f"multipart body could not be parsed: {fault.rstrip('.')}; send multipart/form-data "
        f"with its boundary (curl -F {field_name}=@crop.jpg sets both)"
    )


def _from_json(
    body: bytes, settings: Settings, field_name: str, many: bool, model: type[BaseModel]
) -> ImageInput:
    if not body.strip():
        raise InvalidRequest(EMPTY_JSON_BODY, code="invalid_json")
    try:
        document = loads_unique(body)
    except DuplicateKey as exc:
        raise ValidationFailed(str(exc)) from None
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of over 4300 digits
        raise InvalidRequest(not_json_message(exc, body), code="invalid_json") from None
    except RecursionError:  # [[[[...]]]] a hundred thousand deep
        raise InvalidRequest(NESTED_TOO_DEEPLY, code="invalid_json") from None
    if many and isinstance(document, dict) and isinstance(document.get(field_name), list):
        _check_count(len(document[field_name]), settings)
    try:
        parsed = model.model_validate(document)
    except ValidationError as exc:
        raise ValidationFailed(describe_validation_errors(list(exc.errors()))) from None
    values = parsed.model_dump()
    encoded = values.pop(field_name)
    items: list[str] = encoded if many else [encoded]
    locations = _locations(field_name, len(items), many)
    images = [_b64decode(text, where) for text, where in zip(items, locations, strict=True)]
    return ImageInput(images, locations, values)


async def _from_multipart(
    request: Request, settings: Settings, field_name: str, many: bool, options: dict[str, type]
) -> ImageInput:
    # One file over the limit still parses, so that _check_count names the setting;
    # the parser stops at the next one, and that refusal is turned into the same 413.
    max_files = settings.max_batch_images + 1
    # A part without a filename is a text field to Starlette, and RFC 7578 makes the
    # filename optional (generated clients leave it out): any image may be one.
    max_fields = max_files + len(options) + 8
    framing = MultipartFraming.for_request(request)
    if framing is not None:
        request = Request(request.scope, framing)
    try:
        form = await request.form(max_files=max_files, max_fields=max_fields)
    except (MultiPartException, HTTPException) as exc:
        # Inside an app Starlette turns the parser's MultiPartException into a plain 400.
        reason = exc.detail if isinstance(exc, HTTPException) else exc.message
        if isinstance(exc, HTTPException) and exc.status_code != 400:
            raise
        if str(reason).startswith("Part exceeded maximum size"):
            limit = str(reason).split("size of ")[-1].rstrip(".")
            raise PayloadTooLarge(
                f"a form field is over the multipart parser's {limit} limit for text fields; "
                "send images as file parts, and at most "
                f"{settings.max_batch_images} boxes (CLIP_MAX_BATCH_IMAGES)"
            ) from None
        if str(reason).startswith("Too many fields"):
            takes = f"`{field_name}`" + "".join(f", `{name}`" for name in options)
            raise PayloadTooLarge(
                f"more than {max_fields} form fields in one request; this endpoint takes "
                f"{takes}, with at most {settings.max_batch_images} images "
                "(CLIP_MAX_BATCH_IMAGES): send only those"
            ) from None
        if str(reason).startswith("Too many files"):
            raise PayloadTooLarge(
                f"more than {max_files} file parts in one request, over the limit of "
                f"{settings.max_batch_images} images (CLIP_MAX_BATCH_IMAGES); split the batch"
            ) from None
        raise InvalidRequest(
            _unparsed_multipart_message(exc, str(reason), field_name), code="invalid_multipart"
        ) from None
    try:
        if framing is not None and not framing.closed:
            # Starlette keeps the parts that were whole and drops the rest unsaid.
            raise InvalidRequest(
                "multipart body ended before its closing boundary "
                f"`--{shown(framing.boundary.decode('latin-1'))}--`: the upload was cut short or "
                "is not multipart; send the whole body (curl -F "
                f"{field_name}=@crop.jpg writes it)",
                code="invalid_multipart",
            )
        unexpected = sorted(set(form.keys()) - {field_name, *options})
        if unexpected:
            raise ValidationFailed(
                f"unexpected field(s) {shown(', '.join(unexpected))}; this endpoint takes "
                f"`{field_name}`" + "".join(f", `{name}`" for name in options)
            )
        parts = form.getlist(field_name)
        if not parts:
            raise ValidationFailed(
                f"field `{field_name}` is missing: add the image as a multipart file part "
                f"named `{field_name}`"
            )
        if not many and len(parts) > 1:
            hint = "use /embed/batch for several" if request.url.path == "/embed" else "send one"
            raise ValidationFailed(
                f"{len(parts)} `{field_name}` parts sent; {request.url.path} takes one, {hint}"
            )
        repeated = [name for name in options if len(form.getlist(name)) > 1]
        if repeated:
            raise ValidationFailed(
                f"field(s) {', '.join(f'`{name}`' for name in repeated)} sent more than "
                "once; send each once"
            )
        if many:
            _check_count(len(parts), settings)
        locations = _locations(field_name, len(parts), many)
        images = []
        for part in parts:
            images.append(await part.read() if isinstance(part, UploadFile) else _bytes_of(part))
        values = {name: _coerce(form.get(name), kind, name) for name, kind in options.items()}
        return ImageInput(images, locations, {k: v for k, v in values.items() if v is not None})
    finally:
        await form.close()


def _bytes_of(text: str) -> bytes:
    """The bytes of a part sent without a filename (RFC 7578 makes it optional, and
    generated clients leave it out), which Starlette hands over as text: decoded as UTF-8
    where that worked, else as Latin-1, which every image file is, and which maps back
    byte for byte."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _coerce(value: Any, kind: type, name: str) -> Any:
    if value is None:
        return None
    if isinstance(value, UploadFile):
        raise ValidationFailed(f"`{name}` must be a plain form field, not a file")
    text = str(value).strip().lower()
    if kind is bool:
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        if not text:
            # An empty field (`-F analyze=`) read as false would drop what was asked for.
            raise ValidationFailed(
                f"`{name}` is empty; send true or false, or leave the field out for false"
            )
        raise ValidationFailed(f"`{name}` must be true or false, got {shown(repr(value))}")
    try:
        return kind(value)
    except ValueError:
        raise ValidationFailed(
            f"`{name}` must be a {kind.__name__}, got {shown(repr(value))}"
        ) from None


def _check_count(count: int, settings: Settings) -> None:
    if count > settings.max_batch_images:
        raise PayloadTooLarge(
            f"{count} images in one request, over the limit of {settings.max_batch_images} "
            "(CLIP_MAX_BATCH_IMAGES); split the batch"
        )


def _locations(field_name: str, count: int, many: bool) -> list[str]:
    return [f"{field_name}[{i}]" for i in range(count)] if many else [field_name]


def _b64decode(text: str, where: str) -> bytes:
    try:
        return decode_base64(text)
    except Base64Error as exc:
        raise InvalidBase64(f"{where} is not valid base64: {exc}") from None


def image_request_body(
    field_name: str, many: bool, json_model: type[BaseModel], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`openapi_extra` documenting both accepted request forms."""
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    image_property: dict[str, Any] = (
        {
            "type": "array",
            "items": file_schema,
            "minItems": 1,
            "description": "Image files, repeated field (at most CLIP_MAX_BATCH_IMAGES).",
        }
        if many
        else {**file_schema, "description": "The image file (JPEG, PNG, WebP, BMP, GIF, TIFF)."}
    )
    form_properties: dict[str, Any] = {field_name: image_property, **(extra or {})}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": form_properties,
                        "required": [field_name],
                        "additionalProperties": False,  # other fields get 422
                    }
                },
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }
