import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import (
    Backend,
    LogLevel,
    MisspeltApiKeys,
    Precision,
    ResizeMode,
    Settings,
    load_settings,
    unknown_variables,
)


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("CLIP_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert (settings.model, settings.pretrained) == ("ViT-B-32", "openai")
    assert settings.device == "auto"
    assert settings.precision == Precision.AUTO
    assert (settings.max_batch_size, settings.max_wait_ms, settings.max_queue) == (32, 5.0, 1024)
    assert settings.request_timeout_s == 30
    assert settings.max_batch_images == 64
    assert settings.max_upload_bytes == 10_485_760
    assert settings.max_image_pixels == 40_000_000
    assert settings.api_keys == []
    assert settings.projection == ""
    assert settings.resize_mode == ResizeMode.MODEL


def test_environment_is_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIP_MODEL", "local-dir:/models/x")
    monkeypatch.setenv("CLIP_DEVICE", "CUDA:1")
    monkeypatch.setenv("CLIP_PRECISION", "bf16")
    monkeypatch.setenv("CLIP_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("CLIP_API_KEYS", " alpha, beta ,,")
    monkeypatch.setenv("CLIP_RESIZE_MODE", "longest")
    settings = Settings()
    assert settings.model == "local-dir:/models/x"
    assert settings.device == "cuda:1"
    assert settings.precision == Precision.BF16
    assert settings.max_wait_s == pytest.approx(0.0025)
    assert [k.get_secret_value() for k in settings.api_keys] == ["alpha", "beta"]
    assert "alpha" not in repr(settings)  # keys never reach logs
    assert settings.resize_mode == ResizeMode.LONGEST


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CLIP_DEVICE", "tpu"),
        ("CLIP_PRECISION", "fp8"),
        ("CLIP_MAX_BATCH_SIZE", "0"),
        ("CLIP_MAX_WAIT_MS", "-1"),
        ("CLIP_RESIZE_MODE", "stretch"),
        ("CLIP_MODEL", "local-dir:"),
        ("CLIP_DEVICE", "mps"),  # no Apple GPU path: it used to pass, then crash the load
        ("CLIP_REQUEST_TIMEOUT_S", "inf"),  # passed gt=0, then crashed uvicorn's setup
        ("CLIP_MAX_WAIT_MS", "nan"),
        ("CLIP_REQUEST_TIMEOUT_S", "-inf"),
    ],
)
def test_bad_values_fail_at_startup_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("CLIP_").lower()) as caught:
        Settings()
    if value.lstrip("-") in ("inf", "nan"):
        assert "finite number" in str(caught.value)


@pytest.mark.parametrize("value", ["0.1,0.2", "0.1,0.2,0.5,0.9", "0.5", "0.7,0.5,0.2"])
def test_region_bounds_say_what_they_must_be_whatever_is_wrong(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CLIP_REGION_BOUNDS", value)
    with pytest.raises(ValidationError, match="three increasing fractions in") as caught:
        Settings()
    assert "Field required" not in str(caught.value)


def set_environment(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)


def test_the_queue_must_hold_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIP_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("CLIP_MAX_QUEUE", "32")
    with pytest.raises(ValidationError, match="CLIP_MAX_QUEUE"):
        Settings()


@pytest.mark.parametrize(
    ("environment", "named"),
    [
        ({"CLIP_MAX_BATCH_IMAGES": "64", "CLIP_MAX_QUEUE": "48"}, "CLIP_MAX_QUEUE"),
        (
            {"CLIP_MAX_BATCH_SIZE": "1", "CLIP_MAX_BATCH_IMAGES": "1", "CLIP_MAX_QUEUE": "2"},
            "CLIP_MAX_QUEUE",
        ),  # an /analyze with its embedding is 3 images
        (
            {"CLIP_MAX_IMAGE_PIXELS": "50000000", "CLIP_MAX_REQUEST_PIXELS": "40000000"},
            "CLIP_MAX_REQUEST_PIXELS",
        ),
        (
            {"CLIP_MAX_REQUEST_PIXELS": "300000000", "CLIP_MAX_PIXELS_IN_FLIGHT": "200000000"},
            "CLIP_MAX_PIXELS_IN_FLIGHT",
        ),
    ],
)
def test_every_bound_holds_one_largest_valid_request(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], named: str
) -> None:
    """Otherwise a valid request would be refused forever."""
    set_environment(monkeypatch, environment)
    with pytest.raises(ValidationError, match=named):
        Settings()


@pytest.mark.parametrize("value", [",", " , ,", ",,"])
def test_api_keys_of_separators_only_fail_rather_than_disable_auth(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CLIP_API_KEYS", value)
    with pytest.raises(ValidationError, match="CLIP_API_KEYS"):
        Settings()
    monkeypatch.setenv("CLIP_API_KEYS", "")
    assert Settings().api_keys == []


def test_a_missing_projection_file_fails_with_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CLIP_PROJECTION", str(tmp_path / "pca.safetensors"))
    with pytest.raises(ValidationError, match="CLIP_PROJECTION: no file at"):
        Settings()
    monkeypatch.setenv("CLIP_PROJECTION", str(tmp_path))
    with pytest.raises(ValidationError, match="is a folder, not a projection file"):
        Settings()


def test_a_misspelt_variable_is_named_with_the_setting_meant(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert unknown_variables({"CLIP_MAX_BATCHSIZE": "4", "CLIP_MODEL": "x", "PATH": "/"}) == {
        "CLIP_MAX_BATCHSIZE": "CLIP_MAX_BATCH_SIZE"
    }
    assert unknown_variables({"CLIP_ZZZZZZ": "1"}) == {"CLIP_ZZZZZZ": None}
    monkeypatch.setenv("CLIP_MAX_BATCHSIZE", "4")
    with caplog.at_level(logging.WARNING, logger="app.config"):
        settings = load_settings()
    assert settings.max_batch_size == 32
    assert "CLIP_MAX_BATCHSIZE is not a setting" in caplog.text
    assert "did you mean CLIP_MAX_BATCH_SIZE?" in caplog.text


def test_choices_are_read_whatever_their_case_and_surrounding_spaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLIP_PRECISION", "FP32 ")
    monkeypatch.setenv("CLIP_BACKEND", " OpenVINO")
    monkeypatch.setenv("CLIP_RESIZE_MODE", "Model")
    monkeypatch.setenv("CLIP_LOG_LEVEL", "WARNING")
    settings = Settings()
    assert (settings.precision, settings.backend, settings.resize_mode) == (
        Precision.FP32,
        Backend.OPENVINO,
        ResizeMode.MODEL,
    )
    assert settings.log_level == LogLevel.WARNING


def test_a_log_level_logging_does_not_have_is_named_with_the_choices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.server import describe_invalid_settings

    monkeypatch.setenv("CLIP_LOG_LEVEL", "verbose")
    with pytest.raises(ValidationError) as caught:
        load_settings()
    message = describe_invalid_settings(caught.value)
    assert message.startswith("CLIP_LOG_LEVEL: ")
    assert "'debug', 'info', 'warning' or 'error'" in message
    assert "(got 'verbose')" in message


def test_a_misspelt_api_keys_variable_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warned of and ignored, CLIP_API_KEY=secret served every caller without a key."""
    monkeypatch.setenv("CLIP_API_KEY", "secret")
    with pytest.raises(MisspeltApiKeys, match="rename CLIP_API_KEY to CLIP_API_KEYS"):
        load_settings()
    monkeypatch.setenv("CLIP_API_KEYS", "secret")  # both set: the keys are on; a warning
    assert [key.get_secret_value() for key in load_settings().api_keys] == ["secret"]
    # Settings are read in any case, so typos are caught in any case too.
    monkeypatch.delenv("CLIP_API_KEYS")
    monkeypatch.delenv("CLIP_API_KEY")
    monkeypatch.setenv("clip_api_key", "secret")
    with pytest.raises(MisspeltApiKeys, match="rename clip_api_key to CLIP_API_KEYS"):
        load_settings()
    monkeypatch.setenv("clip_api_keys", "secret")  # the right name, in lower case
    assert [key.get_secret_value() for key in load_settings().api_keys] == ["secret"]
    assert unknown_variables({"clip_max_batchsize": "4"}) == {
        "clip_max_batchsize": "CLIP_MAX_BATCH_SIZE"
    }


def test_a_bad_setting_is_quoted_in_its_error_but_never_an_api_key() -> None:
    from pydantic import ValidationError

    from app.server import describe_invalid_settings

    with pytest.raises(ValidationError) as bad:
        Settings(precision="fp33", max_batch_size="abc")
    message = describe_invalid_settings(bad.value)
    assert "CLIP_PRECISION: Input should be" in message
    assert "(got 'fp33')" in message
    assert "(got 'abc')" in message
    with pytest.raises(ValidationError) as bad_keys:
        Settings(api_keys=" , ")
    assert "' , '" not in describe_invalid_settings(bad_keys.value)


def test_a_request_timeout_past_an_hour_is_refused() -> None:
    """1e300 was taken, and SIGTERM then promised requests a 300-digit number of
    seconds; 30000 (milliseconds meant) would hold a stopping pod for 8 hours."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="less than or equal to 3600"):
        Settings(request_timeout_s=30000)
    assert Settings(request_timeout_s=3600).request_timeout_s == 3600


@pytest.mark.parametrize("keys", ["good,bad key", "good,tab\tkey", "k\x01ey"])
def test_a_key_no_header_can_carry_is_refused(keys: str) -> None:
    """`bad key` was taken, and no client could send it so that it matched."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="holds a space or a control character"):
        Settings(api_keys=keys)


@pytest.mark.parametrize(
    ("environment", "says"),
    [
        ({"CLIP_BACKEND": "onnxruntime", "CLIP_PRECISION": "bf16"}, r"runs fp32, int8 \(or use"),
        ({"CLIP_BACKEND": "openvino", "CLIP_PRECISION": "fp16"}, "runs bf16, fp32, int8"),
        ({"CLIP_DEVICE": "cpu", "CLIP_PRECISION": "fp16"}, "fp16 is for GPUs"),
        ({"CLIP_DEVICE": "cuda", "CLIP_PRECISION": "int8"}, "int8 runs on the CPU only"),
        ({"CLIP_DEVICE": "cuda:1", "CLIP_BACKEND": "openvino"}, "use torch or auto"),
        ({"CLIP_DEVICE": "CUDA", "CLIP_BACKEND": "onnxruntime"}, "use torch or auto"),
    ],
)
def test_a_device_backend_and_precision_no_runtime_runs_fail_with_the_settings(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], says: str
) -> None:
    """Not minutes later, once the weights have loaded: exit 1 with the other settings."""
    set_environment(monkeypatch, environment)
    with pytest.raises(ValidationError, match=says):
        Settings()


@pytest.mark.parametrize(
    "environment",
    [
        {"CLIP_BACKEND": "onnxruntime", "CLIP_PRECISION": "int8"},
        {"CLIP_BACKEND": "onnxruntime"},  # auto precision: fp32 where bf16 would be picked
        {"CLIP_BACKEND": "openvino", "CLIP_PRECISION": "bf16"},
        {"CLIP_BACKEND": "torch", "CLIP_PRECISION": "fp16"},  # device auto: a GPU, perhaps
        {"CLIP_DEVICE": "cuda", "CLIP_PRECISION": "bf16"},
        {"CLIP_DEVICE": "cpu", "CLIP_BACKEND": "onnxruntime", "CLIP_PRECISION": "fp32"},
        {"CLIP_PRECISION": "int8"},  # device auto: start-up refuses it on a GPU
    ],
)
def test_combinations_some_hardware_runs_are_accepted(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]
) -> None:
    set_environment(monkeypatch, environment)
    settings = Settings()
    assert (settings.backend, settings.precision) == (
        Backend(environment.get("CLIP_BACKEND", "auto")),
        Precision(environment.get("CLIP_PRECISION", "auto")),
    )
