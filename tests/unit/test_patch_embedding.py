"""The patch embedding as a matrix product: the convolution's numbers, only where exact,
and the convolution back in place after the export."""

from __future__ import annotations

import pytest
import torch

from app.config import Precision
from app.inference.runtimes.patch_embedding import (
    PatchesTimesWeights,
    patch_embedding_as_matmul,
    replaceable,
)


class TinyVit(torch.nn.Module):
    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.conv1 = conv

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv1(pixels).flatten(1)


@pytest.mark.parametrize(
    ("channels", "patch", "height", "width", "bias", "batch"),
    [(3, 32, 224, 224, False, 3), (3, 16, 64, 96, True, 1), (1, 4, 8, 12, True, 5)],
)
def test_the_product_equals_the_convolution(
    channels: int, patch: int, height: int, width: int, bias: bool, batch: int
) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, 24, kernel_size=patch, stride=patch, bias=bias)
    pixels = torch.randn(batch, channels, height, width)
    with torch.no_grad():
        expected = conv(pixels)
        got = PatchesTimesWeights(conv)(pixels)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_it_holds_views_of_the_weights_not_copies() -> None:
    conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
    replacement = PatchesTimesWeights(conv)
    assert replacement.weight.data_ptr() == conv.weight.data_ptr()
    assert replacement.bias is not None
    assert replacement.bias.data_ptr() == conv.bias.data_ptr()
    assert not list(replacement.state_dict())  # nothing new to save or hash


@pytest.mark.parametrize(
    ("conv", "image_size"),
    [
        (torch.nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1), (64, 64)),  # a ResNet stem
        (torch.nn.Conv2d(3, 8, kernel_size=4, stride=2), (64, 64)),  # overlapping patches
        (torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, padding=1), (64, 64)),
        (torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, dilation=2), (64, 64)),
        (torch.nn.Conv2d(4, 8, kernel_size=4, stride=4, groups=2), (64, 64)),
        (torch.nn.Conv2d(3, 8, kernel_size=(4, 8), stride=(4, 8)), (64, 64)),
        (torch.nn.Conv2d(3, 8, kernel_size=32, stride=32), (224, 200)),  # does not tile
    ],
)
def test_other_convolutions_are_left_alone(
    conv: torch.nn.Conv2d, image_size: tuple[int, int]
) -> None:
    model = TinyVit(conv)
    assert not replaceable(model, image_size)
    with patch_embedding_as_matmul(model, image_size, Precision.INT8) as replaced:
        assert not replaced
        assert model.conv1 is conv


def test_a_tower_without_a_patch_embedding_is_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with patch_embedding_as_matmul(model, (64, 64), Precision.BF16) as replaced:
        assert not replaced


def test_the_convolution_is_put_back_even_when_the_export_fails() -> None:
    conv = torch.nn.Conv2d(3, 8, kernel_size=16, stride=16)
    model = TinyVit(conv)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixels)

    def export() -> None:
        with patch_embedding_as_matmul(model, (64, 64), Precision.BF16) as replaced:
            assert replaced
            assert isinstance(model.conv1, PatchesTimesWeights)
            with torch.no_grad():
                torch.testing.assert_close(model(pixels), expected, rtol=1e-5, atol=1e-5)
            raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        export()
    assert model.conv1 is conv


def test_fp32_keeps_the_convolution_where_the_product_is_no_faster() -> None:
    conv = torch.nn.Conv2d(3, 8, kernel_size=16, stride=16)
    model = TinyVit(conv)
    with patch_embedding_as_matmul(model, (64, 64), Precision.FP32) as replaced:
        assert not replaced
        assert model.conv1 is conv
    with patch_embedding_as_matmul(model, (64, 64), Precision.INT8) as replaced:
        assert replaced
