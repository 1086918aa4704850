"""Admission permits, without HTTP or a model."""

from __future__ import annotations

import pytest

from app.errors import Overloaded, PayloadTooLarge
from app.inference.admission import Admission, AdmissionLimits


def admission(images: int = 8, pixels: int = 1000, per_request: int = 600) -> Admission:
    return Admission(AdmissionLimits(images, pixels, per_request))


def test_images_are_admitted_up_to_the_bound_and_given_back() -> None:
    gate = admission(images=8)
    first, second = gate.admit(5), gate.admit(3)
    assert gate.images_in_flight == 8
    with pytest.raises(Overloaded, match="CLIP_MAX_QUEUE"):
        gate.admit(1)
    assert gate.refused == 1
    first.release()
    first.release()  # idempotent: every exit path may release
    assert gate.images_in_flight == 3
    gate.admit(5).release()
    second.release()
    assert (gate.images_in_flight, gate.pixels_in_flight) == (0, 0)


def test_a_request_over_its_own_pixel_budget_must_shrink() -> None:
    gate = admission(per_request=600)
    ticket = gate.admit(2)
    ticket.add_pixels(400)
    with pytest.raises(PayloadTooLarge, match="CLIP_MAX_REQUEST_PIXELS"):
        ticket.add_pixels(201)
    assert gate.pixels_in_flight == 400  # the refused part was never charged
    assert gate.refused == 0  # not an overload: retrying cannot help
    ticket.release()
    assert gate.pixels_in_flight == 0


def test_pixels_beyond_what_the_service_holds_are_refused_for_now() -> None:
    gate = admission(pixels=1000, per_request=600)
    holding = gate.admit(1)
    holding.add_pixels(600)
    waiting = gate.admit(1)
    with pytest.raises(Overloaded, match="CLIP_MAX_PIXELS_IN_FLIGHT"):
        waiting.add_pixels(500)
    waiting.release()
    holding.release()
    later = gate.admit(1)
    later.add_pixels(500)  # the same request fits once the other is answered
    later.release()
    assert (gate.images_in_flight, gate.pixels_in_flight) == (0, 0)
