"""What `python -m app` says when it cannot listen: the advice follows the cause."""

from __future__ import annotations

import pytest

from app.server import _what_to_do


@pytest.mark.parametrize("host", ["256.1.1.1", "no-such-host.invalid"])
def test_a_host_that_does_not_resolve_is_named(host: str) -> None:
    advice = _what_to_do(host)
    assert "cannot resolve" in advice
    assert "--host" in advice
    assert "--port" not in advice


def test_an_address_of_another_machine_is_named() -> None:
    advice = _what_to_do("192.0.2.1")  # TEST-NET-1: never this machine's
    assert "not an address of this machine" in advice
    assert "--host" in advice


def test_a_local_address_means_the_port_is_the_problem() -> None:
    advice = _what_to_do("127.0.0.1")
    assert "--port" in advice
    assert "--host" not in advice
