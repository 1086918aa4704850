"""The body media types a route takes, declared once.

A route declares `BodyMediaTypes` as a dependency, which refuses any other type with a
415 naming what to send. The body limit (app/api/body_limit.py) asks the same declaration
before it refuses a body for its size without reading it: a body that is too large *and*
of a type the route does not take is told the type, the fix without which a smaller body
fails too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute

from app.api.errors import shown
from app.errors import InvalidRequest, UnsupportedMediaType

MULTIPART = "multipart/form-data"


def media_type_of(content_types: list[str]) -> str:
    """The media type of a body sent with these Content-Type values, lower case and
    without parameters ("" when none is sent). Sent twice, it is refused: servers and
    proxies differ on which copy counts, so a body would be read as one type here and
    checked as the other on its way."""
    if len(content_types) > 1:
        named = ", ".join(shown(value, 40) for value in content_types[:3])
        raise InvalidRequest(
            f"the request has {len(content_types)} Content-Type headers ({named}"
            f"{', ...' if len(content_types) > 3 else ''}); send one",
            code="invalid_http",
        )
    return content_types[0].split(";")[0].strip().lower() if content_types else ""


def request_media_type(request: Request) -> str:
    return media_type_of(request.headers.getlist("content-type"))


def is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


@dataclass(frozen=True)
class BodyMediaTypes:
    """JSON, and multipart/form-data where the route takes images: `file_field` its
    image's file field, `form_fields` the other fields a form must carry, `optional`
    those it may. JSON only where `file_field` is None."""

    file_field: str | None = None
    form_fields: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def refusal(self, media_type: str) -> str | None:
        """What a body of `media_type` is told, or None where the route takes it."""
        if is_json(media_type) or (self.file_field is not None and media_type == MULTIPART):
            return None
        given = f"content type {shown(media_type or 'none')} is not taken here"
        if self.file_field is None:
            return f"{given}; send application/json"
        others = "".join(f" and field `{name}`" for name in self.form_fields)
        if self.optional:
            others += f" (and optionally {', '.join(f'`{n}`' for n in self.optional)})"
        return (
            f"{given}; send {MULTIPART} with file field `{self.file_field}`{others}, or "
            f"application/json with `{self.file_field}` as base64{others}"
        )

    async def __call__(self, request: Request) -> None:
        message = self.refusal(request_media_type(request))
        if message is not None:
            raise UnsupportedMediaType(message)


JSON_ONLY = BodyMediaTypes()


# (method, path) -> what the route there takes.
DeclaredMediaTypes = dict[tuple[str, str], BodyMediaTypes]


def declared_media_types(routers: Iterable[APIRouter]) -> DeclaredMediaTypes:
    """The BodyMediaTypes each route of these routers declares, by method and path."""
    declared: DeclaredMediaTypes = {}
    for router in routers:
        for route in router.routes:
            if not isinstance(route, APIRoute):
                continue
            for dependency in route.dependencies:
                if isinstance(dependency.dependency, BodyMediaTypes):
                    for method in route.methods or ():
                        declared[(method, route.path)] = dependency.dependency
    return declared
