"""The service's log stream is JSON lines, whoever writes to it."""

from __future__ import annotations

import json
import subprocess
import sys

# As the service starts: torch imported (it installs plain-text handlers of its own),
# then the service's logging; then a library logs through torch's logger and warns.
SCRIPT = """
import logging, warnings
import torch
from app.observability import configure_logging
configure_logging()
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found")
warnings.warn("a library's FutureWarning", FutureWarning, stacklevel=1)
"""


def test_library_warnings_and_torch_logs_are_json_lines() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    records = [json.loads(line) for line in result.stderr.strip().splitlines()]  # all JSON
    assert [(r["logger"], r["level"]) for r in records] == [
        ("torch.utils.cpp_extension", "warning"),
        ("py.warnings", "warning"),
    ]
    assert records[0]["message"] == "No CUDA runtime is found"
    assert "a library's FutureWarning" in records[1]["message"]
