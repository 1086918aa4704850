"""Building a module onto its checkpoint's tensors: no random init, no copy, the
module's dtype kept, and torch put back as it was afterwards."""

from __future__ import annotations

import pytest
import torch

from app.inference.checkpoint_init import onto_checkpoint_tensors


def checkpoint(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {
        "weight": torch.arange(12, dtype=dtype).reshape(3, 4),
        "bias": torch.ones(3, dtype=dtype),
    }


def test_the_module_takes_the_checkpoints_tensors_without_a_copy() -> None:
    state = checkpoint()
    with onto_checkpoint_tensors() as loaded_into:
        layer = torch.nn.Linear(4, 3)
        layer.load_state_dict(state)
    assert layer.weight.data_ptr() == state["weight"].data_ptr()
    assert torch.equal(layer.bias, state["bias"])
    assert isinstance(layer.weight, torch.nn.Parameter)
    assert loaded_into == [layer]


def test_initialisers_do_nothing_inside_and_work_again_after() -> None:
    tensor = torch.full((4,), 7.0)
    with onto_checkpoint_tensors():
        torch.nn.init.normal_(tensor)
        torch.nn.init.zeros_(tensor)
        assert torch.equal(tensor, torch.full((4,), 7.0))
    torch.nn.init.zeros_(tensor)
    assert torch.equal(tensor, torch.zeros(4))


def test_a_checkpoint_in_another_dtype_is_cast_to_the_modules() -> None:
    with onto_checkpoint_tensors():
        layer = torch.nn.Linear(4, 3)
        layer.load_state_dict(checkpoint(torch.float16))
    assert layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, checkpoint()["weight"])


def test_missing_keys_are_still_refused() -> None:
    with onto_checkpoint_tensors(), pytest.raises(RuntimeError, match="bias"):
        torch.nn.Linear(4, 3).load_state_dict({"weight": torch.zeros(3, 4)})


def test_load_state_dict_copies_again_after_the_block() -> None:
    with onto_checkpoint_tensors():
        pass
    state = checkpoint()
    layer = torch.nn.Linear(4, 3)
    layer.load_state_dict(state)
    assert layer.weight.data_ptr() != state["weight"].data_ptr()
    assert torch.equal(layer.weight, state["weight"])
