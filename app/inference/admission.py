"""Admission before work: permits for images and decoded pixels in flight.

Like text-embeddings-inference's router, a request takes its permits before anything
costly happens, and gives them back when it is answered. A request that does not fit is
refused at once (Overloaded, retry shortly), or, when it could never fit, told to shrink
(PayloadTooLarge). Two stages, because a request's size is learnt in two steps:

1. images: counted as soon as the HTTP body is parsed, before any header is read;
2. pixels: read from the image headers (cheap), before any pixel is decoded.

So a refusal costs the HTTP parsing and, at most, reading a few headers; the work a
request can buy is bounded by what it is allowed, not by how well its files compress.
Single-threaded (the event loop), so plain counters need no lock. No HTTP in here.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.errors import Overloaded, PayloadTooLarge


@dataclass(frozen=True)
class AdmissionLimits:
    max_images: int  # CLIP_MAX_QUEUE
    max_pixels: int  # CLIP_MAX_PIXELS_IN_FLIGHT
    max_request_pixels: int  # CLIP_MAX_REQUEST_PIXELS


class Admission:
    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.images_in_flight = 0
        self.pixels_in_flight = 0
        self.refused = 0

    def admit(self, images: int) -> Ticket:
        """Permits for `images` model inputs, or Overloaded. Release the ticket when done."""
        if self.images_in_flight + images > self.limits.max_images:
            self.refused += 1
            raise Overloaded(
                f"the service holds {self.images_in_flight} of {self.limits.max_images} images "
                f"(CLIP_MAX_QUEUE) and this request brings {images}; retry shortly"
            )
        self.images_in_flight += images
        return Ticket(self, images)


class Ticket:
    """One request's permits. `release()` is idempotent, so every exit path may call it."""

    def __init__(self, admission: Admission, images: int) -> None:
        self._admission = admission
        self.images = images
        self.pixels = 0
        self._released = False

    def add_pixels(self, pixels: int) -> None:
        """Charge decoded pixels before decoding them: PayloadTooLarge past the request's
        own budget, Overloaded past what the service may hold at once."""
        admission, limits = self._admission, self._admission.limits
        total = self.pixels + pixels
        if total > limits.max_request_pixels:
            raise PayloadTooLarge(
                f"the request's images decode to {total:,} pixels, over the limit of "
                f"{limits.max_request_pixels:,} per request (CLIP_MAX_REQUEST_PIXELS); "
                "send fewer or smaller images"
            )
        if admission.pixels_in_flight + pixels > limits.max_pixels:
            admission.refused += 1
            raise Overloaded(
                f"the service is decoding {admission.pixels_in_flight:,} of "
                f"{limits.max_pixels:,} pixels (CLIP_MAX_PIXELS_IN_FLIGHT) and this request "
                f"brings {pixels:,}; retry shortly"
            )
        admission.pixels_in_flight += pixels
        self.pixels = total

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._admission.images_in_flight -= self.images
        self._admission.pixels_in_flight -= self.pixels
