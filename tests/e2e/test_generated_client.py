"""A client nobody here wrote: openapi-python-client generates one from /openapi.json,
and it must embed, batch, analyze and compare without a hand edit (issue 12)."""

from __future__ import annotations

import base64
import importlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from app.api.schemas import EXAMPLE_IMAGE
from app.codec import decode_embedding
from tests.e2e.test_schemathesis import served
from tests.helpers import cosine, noise_jpeg

pytestmark = pytest.mark.e2e

PACKAGE = "clip_reid_generated"


@pytest.fixture(scope="module")
def generated(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ModuleType]]:
    folder = tmp_path_factory.mktemp("generated-client")
    url, process = served(tiny_model_dir, folder)
    try:
        schema = folder / "openapi.json"
        schema.write_bytes(httpx.get(f"{url}/openapi.json").content)
        binary = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
        assert binary, "openapi-python-client is a dev dependency"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        result = subprocess.run(
            [binary, "generate", "--path", str(schema), "--output-path",
             str(folder / PACKAGE), "--meta", "none"],
            capture_output=True, text=True, timeout=300, env=env, cwd=folder,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        sys.path.insert(0, str(folder))
        try:
            yield url, importlib.import_module(PACKAGE)
        finally:
            sys.path.remove(str(folder))
    finally:
        process.kill()
        process.wait()


def api(package: ModuleType, name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


def test_the_generated_client_round_trips_every_operation(
    generated: tuple[str, ModuleType],
) -> None:
    url, package = generated
    models = api(package, "models")
    file_type = api(package, "types").File
    client = api(package, "client").Client(base_url=url, raise_on_unexpected_status=True)
    embed = api(package, "api.embeddings.embed_embed_post")
    embed_batch = api(package, "api.embeddings.embed_batch_embed_batch_post")
    analyze = api(package, "api.analysis.analyze_analyze_post")
    similarity = api(package, "api.similarity.similarity_similarity_post")
    crop = noise_jpeg(4)

    def file() -> Any:
        return file_type(payload=io.BytesIO(crop), file_name="crop.jpg", mime_type="image/jpeg")

    as_file = embed.sync(client=client, body=models.EmbedEmbedPostFilesBody(image=file()))
    as_json = embed.sync(
        client=client,
        body=models.EmbedEmbedPostJsonEmbedJSONRequest(image=base64.b64encode(crop).decode()),
    )
    ours = httpx.post(f"{url}/embed", files={"image": ("c.jpg", crop)}).json()["embedding"]
    assert as_file.embedding == as_json.embedding == ours

    batch = embed_batch.sync(
        client=client, body=models.EmbedBatchEmbedBatchPostFilesBody(images=[file(), file()])
    )
    assert batch.embeddings == [ours, ours]

    outfit = analyze.sync(
        client=client,
        body=models.AnalyzeAnalyzePostFilesBody(image=file(), include_embedding=True),
    )
    assert outfit.top.color
    assert outfit.bottom.type_
    assert cosine(decode_embedding(outfit.embedding), decode_embedding(ours)) > 0.999

    other = embed.sync(
        client=client, body=models.EmbedEmbedPostJsonEmbedJSONRequest(image=EXAMPLE_IMAGE)
    ).embedding
    pair = similarity.sync(client=client, body=models.PairSimilarityRequest(a=ours, b=other))
    expected = cosine(decode_embedding(ours), decode_embedding(other))
    assert pair.similarity == pytest.approx(expected, abs=1e-5)
    search = similarity.sync(
        client=client,
        body=models.SearchSimilarityRequest(queries=[other], gallery=[ours, other], top_k=1),
    )
    assert [[m.index for m in row] for row in search.matches] == [[1]]

    # As a generated client is most often used: no file name, and ?dtype= in the URL
    # while the body leaves its dtype unset.
    bare = file_type(payload=io.BytesIO(crop))
    assert (
        embed.sync(client=client, body=models.EmbedEmbedPostFilesBody(image=bare)).embedding == ours
    )
    halves = httpx.post(f"{url}/embed?dtype=float16", files={"image": ("c.jpg", crop)}).json()[
        "embedding"
    ]
    url_dtype = next(
        getattr(models, name)
        for name in dir(models)
        if name.startswith("SimilaritySimilarityPostDtype")
    )
    same = similarity.sync(
        client=client,
        body=models.PairSimilarityRequest(a=halves, b=halves),
        dtype=url_dtype("float16"),
    )
    assert same.similarity == pytest.approx(1.0, abs=1e-6)


def test_the_generated_client_reads_errors_as_the_schema_says(
    generated: tuple[str, ModuleType],
) -> None:
    url, package = generated
    models = api(package, "models")
    client = api(package, "client").Client(base_url=url)
    embed = api(package, "api.embeddings.embed_embed_post")
    answer = embed.sync_detailed(
        client=client, body=models.EmbedEmbedPostJsonEmbedJSONRequest(image="not base64!")
    )
    assert answer.status_code == 400
    assert isinstance(answer.parsed, models.ErrorResponse)
    assert answer.parsed.error.code == "invalid_base64"
    assert "base64" in answer.parsed.error.message
