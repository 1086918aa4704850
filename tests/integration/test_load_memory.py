"""What building the model costs in memory, on the full ViT-B-32, in a fresh process
(the high-water mark of a process is its whole life's)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

PROBE = """
import json, sys
import torch
from app.config import ResizeMode
from app.inference.model import _build
from app.inference.weights import resolve_model_source

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

before = status("VmRSS")
model, _ = _build(resolve_model_source("local-dir:" + sys.argv[1], ""), ResizeMode.MODEL,
                  torch.device("cpu"))
peak = status("VmHWM")
checksum = float(sum(p.double().sum() for p in model.parameters()))  # every weight, read
print(json.dumps({"before": before, "peak": peak, "checksum": checksum}))
"""


def test_building_holds_one_copy_of_the_weights_not_two(vit_b_32_dir: Path) -> None:
    checkpoint_bytes = sum(p.stat().st_size for p in vit_b_32_dir.glob("*.safetensors"))
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(vit_b_32_dir)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    figures = json.loads(result.stdout.splitlines()[-1])
    # Random init plus a copy of the checkpoint would be 2x; the weights read once, 1x.
    assert figures["peak"] - figures["before"] < 0.6 * checkpoint_bytes, figures
    stored = load_file(next(vit_b_32_dir.glob("*.safetensors")))
    expected = float(sum(tensor.double().sum() for tensor in stored.values()))
    assert math.isclose(figures["checksum"], expected, rel_tol=1e-9)  # the checkpoint's weights
