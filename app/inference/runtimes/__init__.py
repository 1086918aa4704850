"""Where the image tower runs: torch, OpenVINO or ONNX Runtime, behind one call.

Every runtime takes the same normalised float32 batch (N, 3, H, W) and returns raw
features; preprocessing and the L2 normalisation around it stay in model.py, so every
backend sees the same pixels. OpenVINO and ONNX Runtime run a graph exported from the
loaded open_clip tower itself (same weights, nothing extra to ship), converted once and
cached on disk under a key made of the weights' hash, the backend, the precision and the
library versions: a restart, or a second replica on the same volume, loads it in about a
second instead of converting again.

    backend       precisions      how
    torch         fp32 fp16 bf16  weights cast; int8 = torch dynamic quantisation
    openvino      fp32 bf16 int8  IR from ov.convert_model; bf16 as an inference hint;
                                  int8 = static quantisation by NNCF, calibrated on crops
    onnxruntime   fp32 int8       torch.onnx (torch.export) export; int8 = dynamic
                                  quantisation (QInt8)

bf16 and int8 exports take a ViT's patch embedding (a convolution with kernel = stride)
as the equivalent matrix product, which both runtimes run faster (patch_embedding.py).
"""

from app.inference.runtimes.build import build_tower, default_cache_dir, weights_digest
from app.inference.runtimes.choice import pick_backend
from app.inference.runtimes.tower import BackendUnavailable, Tower

__all__ = [
    "BackendUnavailable",
    "Tower",
    "build_tower",
    "default_cache_dir",
    "pick_backend",
    "weights_digest",
]
