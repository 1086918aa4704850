"""The re-ID tools against inputs a user gets wrong: each ends in one line saying what to
fix (status 2), before the model loads or the crops are embedded wherever the inputs
alone tell; never a traceback, a silent default, or a result that looks real."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from app.client import ClipConnectionError, ClipServiceError
from app.inference.projection import Projection, fit_pca
from app.inference.weights import reported_model_id
from app.reid import embedding, eval_reid, fit_projection
from app.reid.dataset import labelled_crops
from tests.helpers import noise_jpeg
from tests.integration.test_reid_toolkit import (
    FAST,
    crop_folder,
    exits_with_one_line,
    market_dataset,
    model_embed_dim,
)

# A model that cannot load: a check that passes this far ran before the model.
NO_MODEL = ["--model", "local-dir:/nowhere", *FAST]


def test_fit_projection_checks_its_options_before_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crops = crop_folder(tmp_path / "crops", 6)
    out = str(tmp_path / "p.safetensors")
    for extra, words in (
        (["--dim", "0"], "--dim 0: ask for 1 or more output dimensions"),
        (["--dim", "-3"], "--dim -3: ask for 1 or more"),
        (["--supervised", "--shrinkage", "0"], "--shrinkage 0.0: give a value in (0, 1]"),
        (["--shrinkage", "0.5"], "without --supervised it does nothing"),  # was ignored
    ):
        exits_with_one_line(
            capsys,
            lambda extra=extra: fit_projection.main([str(crops), *NO_MODEL, *extra, "--out", out]),
            words,
        )
    exits_with_one_line(
        capsys,
        lambda: fit_projection.main([str(tmp_path / "nope"), *NO_MODEL, "--out", out]),
        "nope: no such folder",  # was "holds 0 images"
    )
    exits_with_one_line(
        capsys,
        lambda: fit_projection.main([str(crops), *NO_MODEL, "--out", str(tmp_path)]),
        f"--out {tmp_path} is a folder; name the file to write",
    )
    unwritable = Path("/proc/p.safetensors")  # root passes os.access there
    exits_with_one_line(
        capsys,
        lambda: fit_projection.main([str(crops), *NO_MODEL, "--out", str(unwritable)]),
        "lies in /proc/, not a folder this user can write to",
    )


def test_fit_projection_never_replaces_what_is_not_a_regular_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The write replaces whatever the name points at: as root, --out /dev/null replaced
    the system's /dev/null with a 10 kB file. A FIFO stands in for the device here."""
    crops = crop_folder(tmp_path / "crops", 6)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = tmp_path / "kept.safetensors"
    target.write_bytes(b"theirs")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    a_file = tmp_path / "notes.md"
    a_file.write_text("mine")
    for out, words in (
        (str(fifo), "is not a regular file (a device or a pipe)"),
        (str(link), "is a symbolic link, which the file would replace"),
        (f"{a_file}/", "is a folder; name the file to write"),  # pathlib drops the slash
        (str(a_file / "p.safetensors"), f"lies under {a_file}, which is a file"),
        ("", "--out '' is empty"),
    ):
        exits_with_one_line(
            capsys,
            lambda out=out: fit_projection.main([str(crops), *NO_MODEL, "--out", out]),
            words,
        )
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert link.is_symlink()
    assert target.read_bytes() == b"theirs"
    assert a_file.read_text() == "mine"


def test_fit_projection_past_the_embedding_dim_is_refused_before_the_crops(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    embedded: list[int] = []
    monkeypatch.setattr(fit_projection, "embed_in_process", lambda *a, **k: embedded.append(1))
    crops = crop_folder(tmp_path / "crops", 300)
    dim = model_embed_dim(tiny_model_dir) + 1
    model = ["--model", f"local-dir:{tiny_model_dir}", *FAST]
    exits_with_one_line(
        capsys,
        lambda: fit_projection.main(
            [str(crops), *model, "--dim", str(dim), "--out", str(tmp_path / "p.safetensors")]
        ),
        f"--dim {dim}: local-dir:",
        f"embeds in {dim - 1} dims",
    )
    assert embedded == []


def test_supervised_with_fewer_than_two_identities_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    market = tmp_path / "market"
    market.mkdir()
    for i, name in enumerate(["-1_c1s1_000001_00.jpg", "0000_c2s1_000002_00.jpg"]):
        (market / name).write_bytes(noise_jpeg(i))
    out = str(tmp_path / "p.safetensors")
    exits_with_one_line(
        capsys,
        lambda: fit_projection.main([str(market), "--supervised", *NO_MODEL, "--out", out]),
        "--supervised needs crops of at least 2 identities",
        "has 0 (junk and distractors",
    )


def test_from_linear_refuses_what_it_would_ignore_or_misread(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dim = model_embed_dim(tiny_model_dir)
    head = tmp_path / "head.safetensors"
    save_file(
        {
            "fc.weight": np.random.default_rng(0).normal(size=(8, dim)).astype(np.float32),
            "mu": np.zeros(dim, np.float32),
            "short_mu": np.zeros(dim - 1, np.float32),
            "zero": np.zeros((8, dim), np.float32),
            "none": np.zeros((0, dim), np.float32),
        },
        str(head),
    )
    out = tmp_path / "linear.safetensors"
    common = ["--from-linear", str(head), "--for-model", f"local-dir:{tiny_model_dir}"]
    common += ["--out", str(out)]
    for extra, words in (
        (
            ["--weight-key", "fc.weight", "--mean-key", "mu_typo"],
            "no tensor 'mu_typo' (--mean-key)",
        ),
        (
            ["--weight-key", "fc.weight", "--mean-key", "short_mu"],
            f"a mean to subtract first is ({dim},)",
        ),
        (["--weight-key", "fc.weight", "--dim", "16"], "it takes no --dim"),
        (["--weight-key", "fc.weight", "--whiten", str(tmp_path)], "it takes no"),
        (["--weight-key", "zero"], "weight is all zeros"),  # was written, and served zeros
        (["--weight-key", "none"], "maps to or from 0 dimensions"),  # was served as dim 0
    ):
        exits_with_one_line(
            capsys, lambda extra=extra: fit_projection.main([*common, *extra]), *[words]
        )
        assert not out.exists()
    fit_projection.main([*common, "--weight-key", "fc.weight", "--mean-key", "mu"])
    assert Projection.load(out).output_dim == 8


def test_an_unreadable_crop_is_named_not_a_traceback(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crops = crop_folder(tmp_path / "crops", 4)
    (crops / "broken.jpg").write_bytes(b"plain text, not a picture")
    model = ["--model", f"local-dir:{tiny_model_dir}", *FAST]
    out = str(tmp_path / "p.safetensors")
    exits_with_one_line(
        capsys,
        lambda: fit_projection.main([str(crops), *model, "--dim", "2", "--out", out]),
        f"{crops / 'broken.jpg'}: file is not a decodable image",
        "fix or remove it",
    )


def test_eval_reid_refuses_a_dataset_with_nothing_to_score_before_embedding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every match on the query's own camera: it printed 0.0 everywhere, exit 0."""
    root = tmp_path / "same_camera"
    (root / "query").mkdir(parents=True)
    (root / "bounding_box_test").mkdir()
    for person in (1, 2):
        (root / "query" / f"{person:04d}_c1s1_000001_00.jpg").write_bytes(noise_jpeg(person))
        (root / "bounding_box_test" / f"{person:04d}_c1s1_000002_00.jpg").write_bytes(
            noise_jpeg(person + 5)
        )
    exits_with_one_line(
        capsys,
        lambda: eval_reid.main([str(root), *NO_MODEL, "--out", str(tmp_path / "r")]),
        "none of the 2 queries",
        "there is nothing to score",
    )


def test_eval_reid_checks_out_and_dataset_before_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = market_dataset(tmp_path / "market", people=2)
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    for out, words in (
        (str(a_file), "is a file; name a folder"),
        (str(a_file / "sub"), f"{a_file} is not a folder"),
        ("/proc/reid", "cannot write in /proc/"),
        ("", "--out '': is empty"),  # was the current folder
    ):
        exits_with_one_line(
            capsys,
            lambda out=out: eval_reid.main([str(dataset), *NO_MODEL, "--out", out]),
            f"--out {out or repr(out)}",
            words,
        )
    exits_with_one_line(
        capsys,
        lambda: eval_reid.main([str(tmp_path / "nope"), *NO_MODEL]),
        "nope: no such folder",
    )


def test_eval_reid_keeps_a_row_per_projection_when_two_share_a_name(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = market_dataset(tmp_path / "market", people=3)
    dim = model_embed_dim(tiny_model_dir)
    rows = np.random.default_rng(1).normal(size=(40, dim)).astype(np.float32)
    files = []
    for folder, out_dim in (("a", 4), ("b", 6)):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "pca.safetensors"
        fit_pca(rows, out_dim, reported_model_id(f"local-dir:{tiny_model_dir}"))[0].save(path)
        files += ["--projection", str(path)]
    model = ["--model", f"local-dir:{tiny_model_dir}", *FAST]
    results = eval_reid.main([str(dataset), *model, *files, "--out", str(tmp_path / "r")])
    assert len(results) == 3  # raw and both files; one of the two was lost
    assert {name.split(" ")[0] for name in results} == {
        "raw",
        str(tmp_path / "a" / "pca.safetensors"),
        str(tmp_path / "b" / "pca.safetensors"),
    }


@pytest.mark.parametrize(
    ("fault", "status", "words"),
    [
        (KeyboardInterrupt(), 130, "interrupted; no file was left half-written"),  # 128 + SIGINT
        (ClipConnectionError("the CLIP service at http://x closed the connection", "http://x"), 1,
         "closed the connection"),
    ],
)  # fmt: skip
def test_ctrl_c_and_a_service_that_goes_away_end_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fault: BaseException,
    status: int,
    words: str,
) -> None:
    dataset = market_dataset(tmp_path / "market", people=2)

    def raising(*args: object, **kwargs: object) -> Any:
        raise fault

    monkeypatch.setattr(eval_reid, "service_info", lambda url, key: {"model": "m", "dim": 8})
    monkeypatch.setattr(eval_reid, "embed_via_service", raising)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as caught:
        eval_reid.main([str(dataset), "--url", "http://x", "--out", str(out)])
    assert caught.value.code == status
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert words in stderr.splitlines()[-1]
    assert not out.exists()


def test_a_crop_the_service_refuses_is_named_by_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service names it by its place in the batch (images[1]), not by its file."""
    paths = [tmp_path / f"{i}.jpg" for i in range(3)]

    def refusing(self: object, images: list[Path]) -> Any:
        raise ClipServiceError(400, "invalid_image", "images[1]: file is not a decodable image")

    monkeypatch.setattr("app.client.ClipClient.embed_batch", refusing)
    with pytest.raises(embedding.UnreadableCrop, match=rf"{paths[1]}: file is not a decodable"):
        embedding.embed_via_service(paths, "http://x")


def test_one_misnamed_crop_among_market_names_is_named_not_relabelled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It switched the whole folder to the one-folder-per-identity layout: every crop
    under bounding_box_train/ became one identity, and the message spoke of --dim."""
    train = tmp_path / "market" / "bounding_box_train"
    train.mkdir(parents=True)
    for person in (1, 2, 3):
        (train / f"{person:04d}_c1s1_000001_00.jpg").write_bytes(noise_jpeg(person))
    (train / "person1.jpg").write_bytes(noise_jpeg(9))
    out = str(tmp_path / "p.safetensors")
    exits_with_one_line(
        capsys,
        lambda: fit_projection.main(
            [str(tmp_path / "market"), "--supervised", *NO_MODEL, "--out", out]
        ),
        f"{train / 'person1.jpg'} is not named PPPP_cCsS_... though 3 of the 4 crops are",
    )


def test_market_names_in_sub_folders_are_labelled_by_name_and_said_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder, person in (("alice", 1), ("bob", 1), ("carol", 2)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{person:04d}_c1s1_00000{person}_00.jpg").write_bytes(b"x")
    crops = labelled_crops(tmp_path)
    assert crops.layout == "market1501"
    assert crops.names == ["1", "2"]
    assert "labelled by their Market-1501 names; the 3 sub-folders" in capsys.readouterr().err


def test_results_stopped_while_being_written_leave_the_earlier_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r"
    run = {"model": "m", "precision": "fp32", "backend": "torch", "ap_mode": "torchreid"}
    eval_reid.write_results(out, "d", run, {}, {})
    before = (out / "reid.json").read_text()

    def stopped(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_reid.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        eval_reid.write_results(out, "d", run, {}, {"x.safetensors": "failed"})
    assert (out / "reid.json").read_text() == before  # whole, and the earlier one


def test_the_tools_answer_help_and_option_mistakes_without_importing_torch() -> None:
    """torch and open_clip took 3-4 s to import before --help printed, and a Ctrl-C in
    those seconds was a traceback; they now load with the model, inside the tools'
    one-line error handling."""
    script = (
        "import sys, app.reid.eval_reid, app.reid.fit_projection; "
        "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


def test_ctrl_c_while_the_model_loads_ends_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = market_dataset(tmp_path / "market", people=2)

    def interrupted(settings: object) -> Any:
        raise KeyboardInterrupt  # as if in the middle of importing torch

    monkeypatch.setattr(eval_reid, "load_encoder", interrupted)
    with pytest.raises(SystemExit) as caught:
        eval_reid.main([str(dataset), *NO_MODEL, "--out", str(tmp_path / "r")])
    assert caught.value.code == 130
    assert "Traceback" not in capsys.readouterr().err
