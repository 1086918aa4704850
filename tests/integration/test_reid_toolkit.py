"""Projection served by the API, float16 transport, fit-projection and eval-reid end to end."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from app.codec import decode_embedding, encode_embedding
from app.config import Settings
from app.inference.projection import Projection, ProjectionError, fit_pca
from app.reid import eval_reid, fit_projection
from app.tools.random_model import write_random_model
from app.tools.synthetic_people import make_person, random_garment, write_market_layout
from tests.conftest import serve
from tests.helpers import noise_jpeg


def market_dataset(root: Path, people: int = 6) -> Path:
    """A tiny Market-1501 layout: each person in 3 cameras, plus junk and distractors."""
    rng = np.random.default_rng(3)
    (root / "query").mkdir(parents=True)
    (root / "bounding_box_test").mkdir()
    for person in range(1, people + 1):
        outfit = (random_garment(rng), random_garment(rng))
        for camera in (1, 2, 3):
            folder = "query" if camera == 1 else "bounding_box_test"
            name = f"{person:04d}_c{camera}s1_{person * 10 + camera:06d}_00.jpg"
            (root / folder / name).write_bytes(make_person(rng, outfit).jpeg)
    (root / "bounding_box_test" / "-1_c1s1_000001_00.jpg").write_bytes(noise_jpeg(1))
    (root / "bounding_box_test" / "0000_c2s1_000002_00.jpg").write_bytes(noise_jpeg(2))
    return root


def crop_folder(folder: Path, count: int) -> Path:
    """`count` noise crops, 0.jpg onwards."""
    folder.mkdir()
    for seed in range(count):
        (folder / f"{seed}.jpg").write_bytes(noise_jpeg(seed))
    return folder


def model_embed_dim(model_dir: Path) -> int:
    """The embedding dimension a local-dir model's config declares."""
    config = json.loads((model_dir / "open_clip_config.json").read_text())
    return int(config["model_cfg"]["embed_dim"])


async def test_embed_returns_the_projected_dim_matching_numpy_by_hand(
    tiny_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    crops = [noise_jpeg(seed) for seed in range(12)]
    async with serve(tiny_settings(warmup=False)) as (_, client):
        info = (await client.get("/info")).json()
        raw = [
            decode_embedding(
                (await client.post("/embed", files={"image": ("c", c)})).json()["embedding"]
            )
            for c in crops
        ]
    projection, _ = fit_pca(np.stack(raw), 8, info["model"])
    path = tmp_path / "pca8.safetensors"
    projection.save(path)
    async with serve(tiny_settings(projection=str(path), warmup=False)) as (_, client):
        info = (await client.get("/info")).json()
        body = (await client.post("/embed", files={"image": ("c", crops[0])})).json()
        analyzed = (
            await client.post(
                "/analyze", files={"image": ("c", crops[0])}, data={"include_embedding": "true"}
            )
        ).json()
    assert (info["dim"], info["projection"]) == (8, "pca")
    served = decode_embedding(body["embedding"])
    assert body["dim"] == 8
    assert float(np.linalg.norm(served)) == pytest.approx(1.0, abs=1e-5)
    by_hand = (raw[0] - projection.mean) @ projection.weight.T
    np.testing.assert_allclose(served, by_hand / np.linalg.norm(by_hand), atol=1e-5)
    np.testing.assert_allclose(decode_embedding(analyzed["embedding"]), served, atol=1e-5)


async def test_a_projection_fitted_at_another_precision_is_served_with_a_warning(
    tiny_settings: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The README says to fit at the precision served; nothing said when it was not."""
    async with serve(tiny_settings(warmup=False)) as (_, client):
        info = (await client.get("/info")).json()
    rows = np.random.default_rng(0).normal(size=(20, info["dim"])).astype(np.float32)
    projection = fit_pca(rows, 4, info["model"])[0]
    warnings = []
    for precision, backend in ((info["precision"], info["backend"]), ("bf16", "openvino")):
        path = tmp_path / f"{precision}.safetensors"
        metadata = {**projection.metadata, "precision": precision, "backend": backend}
        dataclasses.replace(projection, metadata=metadata).save(path)
        caplog.clear()
        async with serve(tiny_settings(projection=str(path), warmup=False)) as (_, client):
            assert (await client.get("/info")).json()["dim"] == 4  # served all the same
        warnings.append(
            [r.getMessage() for r in caplog.records if "was fitted on" in r.getMessage()]
        )
    assert warnings[0] == []
    assert len(warnings[1]) == 1
    assert (
        f"fitted on bf16 (openvino) embeddings, and this service runs {info['precision']}"
        in (warnings[1][0])
    )


async def test_a_projection_for_another_model_stops_startup(
    tiny_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path = tmp_path / "other.safetensors"
    fit_pca(np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32), 4, "ViT-L-14/x")[
        0
    ].save(path)
    with pytest.raises(ProjectionError, match="CLIP_PROJECTION"):
        async with serve(tiny_settings(projection=str(path), warmup=False)):
            pass


@pytest.mark.parametrize(
    ("contents", "says"),
    [
        (b"not a tensor file", "not a readable safetensors file"),
        (None, "weight holds 1 NaN"),
    ],
)
async def test_a_broken_projection_file_stops_startup_before_the_model_loads(
    tiny_settings: Callable[..., Settings], tmp_path: Path, contents: bytes | None, says: str
) -> None:
    """Read before the seconds of loading a model (minutes on a cold conversion), so
    that a crash-looping pod says so at once."""
    path = tmp_path / "broken.safetensors"
    if contents is None:
        weight = np.eye(4, 64, dtype=np.float32)
        weight[0, 0] = np.nan
        save_file({"weight": weight, "mean": np.zeros(64, np.float32)}, str(path),
                  metadata={"model": "any"})  # fmt: skip
    else:
        path.write_bytes(contents)
    loads: list[str] = []

    def encoder_factory(settings: Settings, texts: Sequence[str]) -> Any:
        loads.append(settings.model)
        raise AssertionError("the model was loaded before the projection file was read")

    with pytest.raises(ProjectionError, match=f"CLIP_PROJECTION={path}: {says}"):
        async with serve(tiny_settings(projection=str(path), warmup=False), encoder_factory):
            pass
    assert loads == []


async def test_a_linear_head_converted_for_a_local_dir_model_serves(
    tiny_settings: Callable[..., Settings], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """--for-model spelled as CLIP_MODEL is (local-dir:<path>, as the README writes it)
    names the model as /info does, so the service takes the file."""
    embed_dim = model_embed_dim(tiny_model_dir)
    head = tmp_path / "head.safetensors"
    weight = np.random.default_rng(1).normal(size=(8, embed_dim)).astype(np.float32)
    save_file({"fc.weight": weight}, str(head))
    out = tmp_path / "linear8.safetensors"
    fit_projection.main(
        ["--from-linear", str(head), "--weight-key", "fc.weight",
         "--for-model", f"local-dir:{tiny_model_dir}", "--out", str(out)]
    )  # fmt: skip
    async with serve(tiny_settings(projection=str(out), warmup=False)) as (_, client):
        info = (await client.get("/info")).json()
    assert (info["dim"], info["projection"]) == (8, "linear")
    assert Projection.load(out).model == info["model"] == f"local-dir:{tiny_model_dir.name}"


async def test_float16_transport_end_to_end(tiny_settings: Callable[..., Settings]) -> None:
    async with serve(tiny_settings(warmup=False)) as (_, client):
        half = (
            await client.post("/embed?dtype=float16", files={"image": ("c", noise_jpeg(1))})
        ).json()
        full = (await client.post("/embed", files={"image": ("c", noise_jpeg(1))})).json()
        batch = (
            await client.post(
                "/embed/batch?dtype=float16", files=[("images", ("c", noise_jpeg(1)))]
            )
        ).json()
        a = decode_embedding(half["embedding"], "float16")
        pair = await client.post(
            "/similarity",
            json={"a": half["embedding"], "b": encode_embedding(a, "float16"), "dtype": "float16"},
        )
        wrong = await client.post("/embed?dtype=float8", files={"image": ("c", noise_jpeg(1))})
    assert half["dtype"] == "float16"
    assert full["dtype"] == "float32"
    assert len(__import__("base64").b64decode(half["embedding"])) == 2 * half["dim"]
    np.testing.assert_allclose(a, decode_embedding(full["embedding"]), atol=2e-3)
    assert batch["dtype"] == "float16"
    assert pair.json()["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert wrong.status_code == 422


def test_fit_projection_and_eval_reid_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    dataset = market_dataset(tmp_path / "market")
    model = f"local-dir:{tiny_model_dir}"
    pca = tmp_path / "pca8.safetensors"
    centre = tmp_path / "centre.safetensors"
    crops = str(dataset / "bounding_box_test")
    common = ["--model", model, "--device", "cpu", "--precision", "fp32", "--backend", "torch"]
    fit_projection.main([crops, *common, "--dim", "8", "--out", str(pca)])
    fit_projection.main([crops, *common, "--centre", "--out", str(centre)])
    assert Projection.load(pca).output_dim == 8
    out = tmp_path / "results"
    results = eval_reid.main(
        [
            str(dataset),
            *common,
            "--projection",
            str(pca),
            "--projection",
            str(centre),
            "--out",
            str(out),
        ]
    )
    assert len(results) == 3
    raw = results["raw"]
    assert raw.queries == 6
    assert raw.skipped == 0
    assert 0.0 <= raw.mean_ap <= 1.0
    assert raw.cmc[1] <= raw.cmc[5] <= raw.cmc[10] <= 1.0
    document = json.loads((out / "reid.json").read_text())
    assert set(document["results"]) == set(results)
    assert "| raw |" in (out / "reid.md").read_text()


FAST = ["--device", "cpu", "--precision", "fp32", "--backend", "torch"]


def exits_with_one_line(
    capsys: pytest.CaptureFixture[str], run: Callable[[], object], *expected: str
) -> str:
    """The command ends with status 2 and one line on stderr holding `expected`."""
    capsys.readouterr()  # what earlier commands wrote (progress bars) is not its message
    with pytest.raises(SystemExit) as caught:
        run()
    assert caught.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    # The last line is the message; any before it are the embedding's progress bar.
    message = stderr.splitlines()[-1]
    assert "error: " in message
    assert all(not line or line.startswith("embedding") for line in stderr.splitlines()[:-1])
    for text in expected:
        assert text in message, message
    return message


def test_fit_projection_refuses_whitening_past_the_rank_and_centre_with_dim(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crops = crop_folder(tmp_path / "crops", 6)
    out = tmp_path / "p.safetensors"
    common = [str(crops), "--model", f"local-dir:{tiny_model_dir}", *FAST, "--out", str(out)]
    exits_with_one_line(
        capsys,
        lambda: fit_projection.main([*common, "--dim", "8", "--whiten"]),
        "--dim 8: 6 crops span at most 5 dimensions",
    )
    exits_with_one_line(
        capsys, lambda: fit_projection.main([*common, "--centre", "--dim", "8"]), "--centre"
    )
    exits_with_one_line(
        capsys, lambda: fit_projection.main([*common, "--centre", "--whiten"]), "--centre"
    )
    assert not out.exists()
    fit_projection.main([*common, "--dim", "5", "--whiten"])
    assert Projection.load(out).output_dim == 5


def test_fit_projection_refuses_what_it_could_not_write_or_serve_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crops = crop_folder(tmp_path / "crops", 4)
    model = f"local-dir:{tiny_model_dir}"
    nowhere = str(tmp_path / "missing" / "p.safetensors")
    exits_with_one_line(
        capsys,
        lambda: fit_projection.main([str(crops), "--model", model, *FAST, "--out", nowhere]),
        "missing/, which does not exist",
    )
    embed_dim = model_embed_dim(tiny_model_dir)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": np.ones((4, embed_dim + 3), np.float32)}, str(wrong))
    out = tmp_path / "linear.safetensors"
    linear = ["--for-model", model, "--out", str(out)]
    for source, words in (
        (tmp_path / "absent.safetensors", "no such file"),
        (crops / "0.jpg", "is not a safetensors file"),
        (wrong, f"embeds in {embed_dim} dims"),
    ):
        exits_with_one_line(
            capsys,
            lambda source=source: fit_projection.main(["--from-linear", str(source), *linear]),
            words,
        )
    assert not out.exists()


def test_eval_reid_checks_projections_before_embedding_and_names_its_options(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = market_dataset(tmp_path / "market")
    wrong = tmp_path / "wrong.safetensors"
    fit_pca(np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32), 4, "ViT-L-14/x")[
        0
    ].save(wrong)
    embedded: list[int] = []
    real = eval_reid.embed_in_process
    monkeypatch.setattr(
        eval_reid,
        "embed_in_process",
        lambda paths, *a, **k: embedded.append(1) or real(paths, *a, **k),
    )
    model = ["--model", f"local-dir:{tiny_model_dir}", *FAST]
    message = exits_with_one_line(
        capsys,
        lambda: eval_reid.main([str(dataset), *model, "--projection", str(wrong)]),
        f"--projection={wrong} was fitted for ViT-L-14/x, but --model is local-dir:",
    )
    assert "CLIP_" not in message
    assert "service" not in message
    assert embedded == []
    # A misnamed file is found from its name, before the model is even loaded.
    (dataset / "query" / "nobody.jpg").write_bytes(noise_jpeg(9))
    exits_with_one_line(
        capsys,
        lambda: eval_reid.main([str(dataset), "--model", "local-dir:/nowhere", *FAST[:2]]),
        "nobody.jpg is not named PPPP_cCsS_",
    )
    (dataset / "query" / "nobody.jpg").unlink()
    exits_with_one_line(
        capsys,
        lambda: eval_reid.main([str(dataset), "--model", "local-dir:/nowhere", *FAST[:2]]),
        "--model=local-dir:/nowhere: directory not found",
    )
    assert embedded == []


def test_eval_reid_keeps_the_raw_results_when_a_projection_fails_late(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = market_dataset(tmp_path / "market")
    model = ["--model", f"local-dir:{tiny_model_dir}", *FAST]
    pca = tmp_path / "pca4.safetensors"
    fit_projection.main(
        [str(dataset / "bounding_box_test"), *model, "--dim", "4", "--out", str(pca)]
    )

    def broken(self: Projection, rows: np.ndarray) -> np.ndarray:
        raise MemoryError("out of memory")

    monkeypatch.setattr(Projection, "apply", broken)
    out = tmp_path / "results"
    exits_with_one_line(
        capsys,
        lambda: eval_reid.main([str(dataset), *model, "--projection", str(pca), "--out", str(out)]),
        "1 projection(s) failed",
    )
    document = json.loads((out / "reid.json").read_text())
    assert list(document["results"]) == ["raw"]
    assert document["results"]["raw"]["queries"] == 6
    assert "MemoryError: out of memory" in next(iter(document["failed"].values()))


def test_the_tools_default_to_the_services_precision_and_record_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the service would run is what its CLIP_* environment says.
    monkeypatch.setenv("CLIP_PRECISION", "fp32")
    monkeypatch.setenv("CLIP_BACKEND", "torch")
    monkeypatch.setenv("CLIP_DEVICE", "cpu")
    dataset = market_dataset(tmp_path / "market")
    model = ["--model", f"local-dir:{tiny_model_dir}"]
    pca = tmp_path / "pca4.safetensors"
    fit_projection.main(
        [str(dataset / "bounding_box_test"), *model, "--dim", "4", "--out", str(pca)]
    )
    metadata = Projection.load(pca).metadata
    assert (metadata["precision"], metadata["backend"]) == ("fp32", "torch")
    out = tmp_path / "results"
    eval_reid.main([str(dataset), *model, "--out", str(out), "--ap-mode", "market1501"])
    document = json.loads((out / "reid.json").read_text())
    assert (document["precision"], document["backend"]) == ("fp32", "torch")
    assert document["ap_mode"] == "market1501"
    assert "(fp32, torch)" in (out / "reid.md").read_text()
    # Asked explicitly, the option wins over the environment.
    eval_reid.main([str(dataset), *model, "--out", str(out), "--precision", "bf16"])
    assert json.loads((out / "reid.json").read_text())["precision"] == "bf16"


def same_named_models(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(dataset, first, second, pca): two different tiny models in folders of one name,
    and a PCA fitted on the first."""
    dataset = market_dataset(tmp_path / "market")
    first = write_random_model(tmp_path / "a" / "reid-model", arch="tiny", seed=1)
    second = write_random_model(tmp_path / "b" / "reid-model", arch="tiny", seed=2)
    pca = tmp_path / "pca4.safetensors"
    crops = str(dataset / "bounding_box_test")
    fit_projection.main(
        [crops, "--model", f"local-dir:{first}", *FAST, "--dim", "4", "--out", str(pca)]
    )
    return dataset, first, second, pca


def test_models_in_same_named_folders_are_told_apart_by_their_weights(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, first, second, pca = same_named_models(tmp_path)
    assert len(Projection.load(pca).weights_sha256) == 64
    message = exits_with_one_line(
        capsys,
        lambda: eval_reid.main(
            [
                str(dataset),
                "--model",
                f"local-dir:{second}",
                *FAST,
                "--projection",
                str(pca),
                "--out",
                str(tmp_path / "r"),
            ]
        ),
        "was fitted for local-dir:reid-model",
        "with other weights",
    )
    assert "local-dir:reid-model" in message
    results = eval_reid.main(
        [
            str(dataset),
            "--model",
            f"local-dir:{first}",
            *FAST,
            "--projection",
            str(pca),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert len(results) == 2


async def test_nan_projection_weights_stop_startup_in_one_line(
    tiny_settings: Callable[..., Settings], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "nan.safetensors"
    weight = np.eye(8, 64, dtype=np.float32)
    weight[3, 5] = np.nan
    save_file(
        {"weight": weight, "mean": np.zeros(64, np.float32)},
        str(path),
        metadata={"model": f"local-dir:{tiny_model_dir.name}", "kind": "pca"},
    )
    with pytest.raises(ProjectionError) as caught:
        async with serve(tiny_settings(projection=str(path), warmup=False)):
            pass
    assert str(caught.value).startswith(f"CLIP_PROJECTION={path}: weight holds 1 NaN")
    assert "\n" not in str(caught.value)


async def test_the_service_refuses_a_projection_of_a_same_named_model_with_other_weights(
    tiny_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    _, first, second, pca = same_named_models(tmp_path)
    with pytest.raises(ProjectionError) as caught:
        async with serve(tiny_settings(model=f"local-dir:{second}", projection=str(pca))):
            pass
    assert "with other weights" in str(caught.value)
    async with serve(tiny_settings(model=f"local-dir:{first}", projection=str(pca))) as (_, c):
        assert (await c.get("/info")).json()["dim"] == 4


def test_supervised_projection_beats_pca_on_a_synthetic_labelled_set(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Identities differ by garment colours; each is seen by three cameras in three views
    # and scenes. The test people are not among those fitted on. Random weights: this
    # shows the fit generalises on these features, not what real CLIP weights gain.
    dataset = write_market_layout(
        tmp_path / "synthetic", train_ids=30, test_ids=20, seed=2, distractors=5
    )
    model = ["--model", f"local-dir:{tiny_model_dir}", *FAST]
    train = str(dataset / "bounding_box_train")
    pca, lda = tmp_path / "pca16.safetensors", tmp_path / "lda16.safetensors"
    fit_projection.main([train, *model, "--dim", "16", "--out", str(pca)])
    fitted = fit_projection.main([train, *model, "--supervised", "--dim", "16", "--out", str(lda)])
    assert (fitted.kind, fitted.metadata["identities"]) == ("lda", "30")
    results = eval_reid.main(
        [
            str(dataset),
            *model,
            "--projection",
            str(pca),
            "--projection",
            str(lda),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    pca_map = results["pca16.safetensors (pca, 16-d)"].mean_ap
    lda_map = results["lda16.safetensors (lda, 16-d)"].mean_ap
    assert lda_map > pca_map + 0.05, (lda_map, pca_map)


def test_eval_reid_says_which_queries_it_skips_and_why(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A distractor query (person 0) found the other distractors as its matches; a query
    without a match on another camera was only a count in "+N skipped"."""
    dataset = market_dataset(tmp_path / "market")
    query = dataset / "query"
    (query / "0000_c1s1_000003_00.jpg").write_bytes(noise_jpeg(3))  # a distractor
    (query / "0042_c1s1_000004_00.jpg").write_bytes(noise_jpeg(4))  # nobody to match
    common = ["--model", f"local-dir:{tiny_model_dir}", "--device", "cpu", "--backend", "torch"]
    results = eval_reid.main([str(dataset), *common, "--out", str(tmp_path / "out")])
    assert (results["raw"].queries, results["raw"].skipped) == (6, 2)
    notes = capsys.readouterr().err
    assert "note: 1 of the 8 queries is junk or a distractor" in notes
    assert "note: 1 of the 8 queries has no crop of their person" in notes
