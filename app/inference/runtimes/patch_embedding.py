"""A ViT's patch embedding exported as a matrix product instead of a convolution.

The patch embedding is a convolution whose kernel equals its stride: each patch is
flattened and multiplied by the same (width, 3 * patch * patch) matrix. In reduced
precision the runtimes run that convolution well below the rate of their matrix
products (README, Performance, "The patch embedding as a matrix product"):
- OpenVINO bf16 on a Zen 4 core: 16.3 ms of a 350 ms pass of 8 crops through ViT-B-32,
  against 8.8 ms as a matrix product plus 0.6 ms to cut the patches out;
- ONNX Runtime's dynamic int8 quantises matrix products only, so the convolution stayed
  in fp32: a pass of 8 took 273-309 ms, 224-237 ms with the product.
In fp32 neither gains (OpenVINO the same within 2 %, ONNX Runtime 2-11 % slower), so
fp32 keeps the convolution. Same weights, the same sums in another order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from app.config import Precision


class PatchesTimesWeights(torch.nn.Module):
    """Computes what `conv` (kernel == stride, no padding) computes, in the conv's
    (N, width, rows, columns) layout, by a matrix product over flattened patches."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.patch = int(conv.kernel_size[0])
        self.width = conv.out_channels
        # Views of the conv's own weights: no copy beside them while the export runs.
        weight = conv.weight.detach().reshape(conv.out_channels, -1)
        bias = conv.bias.detach() if conv.bias is not None else None
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        channels, height, width = pixels.shape[1:]
        patch = self.patch
        rows, columns = height // patch, width // patch
        patches = (
            pixels.reshape(-1, channels, rows, patch, columns, patch)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(-1, rows * columns, channels * patch * patch)
        )
        embedded = patches @ self.weight.t()
        if self.bias is not None:
            embedded = embedded + self.bias
        return embedded.permute(0, 2, 1).reshape(-1, self.width, rows, columns)


def replaceable(visual: torch.nn.Module, image_size: tuple[int, int]) -> bool:
    """Whether `visual` has a patch embedding that PatchesTimesWeights computes exactly:
    a `conv1` (open_clip's VisionTransformer's name for it) of square patches, with no
    padding, that tile the image."""
    conv = getattr(visual, "conv1", None)
    if not isinstance(conv, torch.nn.Conv2d):
        return False
    kernel, stride = tuple(conv.kernel_size), tuple(conv.stride)
    if kernel != stride or kernel[0] != kernel[1]:
        return False
    if tuple(conv.padding) != (0, 0) or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        return False
    if conv.padding_mode != "zeros":
        return False
    return all(side % kernel[0] == 0 for side in image_size)


def exported_as_matmul(precision: Precision) -> bool:
    """Whether a tower converted for `precision` takes the matrix product."""
    return precision in (Precision.BF16, Precision.INT8)


@contextlib.contextmanager
def patch_embedding_as_matmul(
    visual: torch.nn.Module, image_size: tuple[int, int], precision: Precision
) -> Iterator[bool]:
    """While the block runs, `visual.conv1` is a PatchesTimesWeights where that is
    exact and pays (exported_as_matmul); the convolution is put back after. Yields
    whether it was replaced."""
    if not exported_as_matmul(precision) or not replaceable(visual, image_size):
        yield False
        return
    conv = visual.conv1
    assert isinstance(conv, torch.nn.Conv2d)  # replaceable() checked
    visual.conv1 = PatchesTimesWeights(conv)
    try:
        yield True
    finally:
        visual.conv1 = conv
