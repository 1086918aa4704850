"""A LitServe server of the same model, as its users would write it: the peer that the
load tool measures our service against, in the same run, with the same clients.

open_clip's own model and transform (fp32 torch, LitServe's default device handling),
JSON base64 in and base64 float32 out like ours, dynamic batching of 16 with a 10 ms
timeout, the model in LitServe's worker process.

    python -m load_tests.litserve_peer --model-dir models/vit-b-32-random --port 8790
    curl -s localhost:8790/predict -d '{"image": "<base64 JPEG>"}'
"""

from __future__ import annotations

import argparse
import base64
import io
from typing import Any

import litserve as ls
import numpy as np
import open_clip
import torch
from PIL import Image


class ClipEmbeddingAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, model_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        model, _, self.transform = open_clip.create_model_and_transforms(
            f"local-dir:{self.model_dir}"
        )
        self.model = model.eval().to(device)
        self.device = device

    def decode_request(self, request: dict[str, str]) -> torch.Tensor:
        image = Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("RGB")
        tensor: torch.Tensor = self.transform(image)
        return tensor

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            features = self.model.encode_image(batch.to(self.device))
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.float().cpu().numpy()

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        vector = output.astype("<f4")
        return {"embedding": base64.b64encode(vector.tobytes()).decode(), "dim": len(vector)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    args = parser.parse_args(argv)
    api = ClipEmbeddingAPI(
        args.model_dir, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
