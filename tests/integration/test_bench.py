"""The benchmark CLI runs end to end on the tiny model and writes its three reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from app.bench import main
from tests.helpers import noise_jpeg


def test_bench_writes_json_markdown_and_plot(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    main(
        [
            "--model", f"local-dir:{tiny_model_dir}",
            "--device", "cpu",
            "--precisions", "int8,openvino:fp32,fp32",
            "--batch-sizes", "1,4",
            "--seconds", "0.05",
            "--pairs", "3",
            "--out", str(out),
        ]
    )  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    configs = [(p["backend"], p["precision"]) for p in result["precisions"]]
    assert configs == [("torch", "fp32"), ("torch", "int8"), ("openvino", "fp32")]  # ref first
    fp32, int8, openvino = result["precisions"]
    assert openvino["cosine_to_fp32_min"] > 0.99999
    assert set(fp32["images_per_s"]) == {"1", "4"}
    assert all(rate > 0 for rate in fp32["images_per_s"].values())
    assert fp32["nan_or_inf"] == 0
    assert fp32["max_norm_error"] < 1e-5
    assert fp32["cosine_to_fp32_min"] is None
    assert int8["cosine_to_fp32_min"] > 0.99
    assert -1 <= fp32["different_outfit_cosine"] <= fp32["same_outfit_cosine"] + 1
    assert result["codec_encode_us"] > 0
    assert result["codec_decode_us"] > 0
    assert "| torch | int8 | cpu | 2 |" in (out / "result.md").read_text()
    assert fp32["streams"] == 2  # torch's default on a CPU: timed with a batch on each
    with Image.open(out / "throughput.png") as plot:
        assert plot.size[0] > 100


def test_bench_measures_agreement_on_your_own_crops(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`--images DIR`: what a user runs on their crops before opting into int8."""
    crops = tmp_path / "crops"
    crops.mkdir()
    for seed in range(5):
        (crops / f"cam1-{seed}.jpg").write_bytes(noise_jpeg(seed))
    (crops / "notes.txt").write_text("not an image: skipped by its suffix")
    out = tmp_path / "bench"
    arguments = ["--model", f"local-dir:{tiny_model_dir}", "--device", "cpu",
                 "--precisions", "fp32,int8", "--batch-sizes", "1", "--seconds", "0.05",
                 "--pairs", "2", "--out", str(out), "--images", str(crops)]  # fmt: skip
    result = main(arguments)
    assert result.images == f"5 from {crops}"
    int8 = result.precisions[1]
    assert int8.precision == "int8"
    assert int8.cosine_to_fp32_min is not None
    assert 0.99 <= int8.cosine_to_fp32_min <= int8.cosine_to_fp32_mean <= 1.0 + 1e-6
    assert f"5 from {crops}" in (out / "result.md").read_text()


def test_bench_names_the_crop_it_cannot_read(tiny_model_dir: Path, tmp_path: Path) -> None:
    crops = tmp_path / "crops"
    crops.mkdir()
    (crops / "a.jpg").write_bytes(noise_jpeg(1))
    (crops / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit, match=r"b\.jpg"):
        main(["--model", f"local-dir:{tiny_model_dir}", "--images", str(crops)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no image files"):
        main(["--model", f"local-dir:{tiny_model_dir}", "--images", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="not a folder"):
        main(["--model", f"local-dir:{tiny_model_dir}", "--images", str(tmp_path / "missing")])


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["--precisions", "torch:fp32,fp99"], "each entry is [backend:]precision"),
        (["--model", "local-dir:/nonexistent"], "--model=local-dir:/nonexistent: directory"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bench_mistakes_end_in_one_line_naming_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], says: str
) -> None:
    with pytest.raises(SystemExit) as caught:
        main([*arguments, "--batch-sizes", "1", "--seconds", "0.1", "--out", str(tmp_path)])
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert says in error.strip().splitlines()[-1]
