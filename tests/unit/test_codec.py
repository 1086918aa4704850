import base64
import struct

import numpy as np
import pytest

from app.codec import (
    EmbeddingDecodeError,
    decode_embedding,
    decode_embeddings,
    encode_embedding,
    encode_embeddings,
)


def test_round_trip_keeps_values_and_infers_dimension() -> None:
    rng = np.random.default_rng(0)
    for dim in (1, 3, 128, 512, 768):
        vector = rng.standard_normal(dim).astype(np.float32)
        decoded = decode_embedding(encode_embedding(vector))
        assert decoded.shape == (dim,)
        assert decoded.dtype == np.float32
        np.testing.assert_array_equal(decoded, vector)


def test_wire_format_is_padded_base64_of_little_endian_float32() -> None:
    text = encode_embedding([1.0, -2.5, 0.25])
    assert base64.b64decode(text) == struct.pack("<3f", 1.0, -2.5, 0.25)
    assert len(text) % 4 == 0  # padded
    assert len(base64.b64decode(encode_embedding(np.zeros(512)))) == 2048


def test_big_endian_and_float64_input_are_converted() -> None:
    vector = np.array([1.5, -3.0], dtype=">f8")
    assert decode_embedding(encode_embedding(vector)).tolist() == [1.5, -3.0]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not base64!", "base64"),
        ("AAAAA", "base64"),  # bad padding
        ("", "empty"),
        (base64.b64encode(b"\x00" * 6).decode(), "multiple of 4"),
        (base64.b64encode(struct.pack("<2f", 1.0, float("nan"))).decode(), "NaN"),
        (base64.b64encode(struct.pack("<2f", float("inf"), 1.0)).decode(), "infinite"),
    ],
)
def test_bad_embeddings_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(EmbeddingDecodeError, match=reason):
        decode_embedding(text)


def test_batch_helpers_keep_order_and_refuse_mixed_dimensions() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(decode_embeddings(encode_embeddings(matrix)), matrix)
    with pytest.raises(ValueError, match="different dimensions"):
        decode_embeddings([encode_embedding([1.0, 2.0]), encode_embedding([1.0])])
    with pytest.raises(ValueError, match="2-D"):
        encode_embeddings(np.zeros(3))


def test_a_dimension_given_refuses_other_lengths_and_names_the_dtype_mixup() -> None:
    vector = np.full(8, 8**-0.5, dtype=np.float32)
    as_float32, as_float16 = encode_embedding(vector), encode_embedding(vector, "float16")
    np.testing.assert_allclose(decode_embedding(as_float32, dim=8), vector)
    with pytest.raises(EmbeddingDecodeError, match="4 float32 values, expected 8: it is float16"):
        decode_embedding(as_float16, dim=8)
    with pytest.raises(EmbeddingDecodeError, match="16 float16 values, expected 8: it is float32"):
        decode_embedding(as_float32, "float16", dim=8)
    with pytest.raises(EmbeddingDecodeError, match=r"8 float32 values, expected 6$"):
        decode_embedding(as_float32, dim=6)


@pytest.mark.parametrize("dim", ["512", 0, True, 8.0])
def test_a_dimension_that_is_not_a_whole_number_is_refused(dim: object) -> None:
    text = encode_embedding(np.full(8, 8**-0.5, dtype=np.float32))
    with pytest.raises(ValueError, match="dim must be a whole number >= 1"):
        decode_embedding(text, dim=dim)  # type: ignore[arg-type]


def test_a_dtype_of_the_wrong_type_gets_the_dtype_message() -> None:
    text = encode_embedding(np.full(8, 8**-0.5, dtype=np.float32))
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, not"):
        decode_embedding(text, ["float32"])  # type: ignore[arg-type]
