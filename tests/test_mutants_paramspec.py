"""The parameter spec's offsets, dtypes and round trips, checked directly (found by mutation
testing: only whole runs reached it before)."""

from __future__ import annotations

import pytest
import torch

from fedguard.models.paramspec import ParamSpec, TensorSpec


def _named() -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([7.0, 8.0], dtype=torch.float64),
        "steps": torch.tensor(5, dtype=torch.int64),
    }


def test_offsets_shapes_dtypes_and_size() -> None:
    spec = ParamSpec.from_tensors(_named())
    assert spec.tensors == (
        TensorSpec("w", (2, 3), "float32", 0),
        TensorSpec("b", (2,), "float64", 6),
        TensorSpec("steps", (), "int64", 8),
    )
    assert spec.size == 9 and spec.names == ("w", "b", "steps")
    assert [t.numel for t in spec.tensors] == [6, 2, 1]
    assert ParamSpec(()).size == 0 and ParamSpec(()).names == ()


def test_flatten_and_unflatten_round_trip() -> None:
    named = _named()
    spec = ParamSpec.from_tensors(named)
    flat = spec.flatten(named)
    assert flat.dtype == torch.float32
    torch.testing.assert_close(flat, torch.tensor([0, 1, 2, 3, 4, 5, 7, 8, 5], dtype=torch.float32))
    back = spec.unflatten(flat)
    assert list(back) == ["w", "b", "steps"]
    for name, value in named.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        torch.testing.assert_close(back[name], value)
    assert ParamSpec(()).flatten({}).shape == (0,)
    assert ParamSpec(()).flatten({}).dtype == torch.float32


def test_flatten_and_unflatten_refuse_mismatches() -> None:
    spec = ParamSpec.from_tensors(_named())
    with pytest.raises(KeyError, match="missing from the model state: b"):
        spec.flatten({k: v for k, v in _named().items() if k != "b"})
    wrong = _named() | {"b": torch.zeros(3)}
    with pytest.raises(ValueError, match="shape"):
        spec.flatten(wrong)
    for bad in (torch.zeros(8), torch.zeros(10), torch.zeros(3, 3)):
        with pytest.raises(ValueError, match="Expected a flat vector of 9 values"):
            spec.unflatten(bad)
    spec.check_vector(torch.zeros(9))


def test_json_round_trip() -> None:
    spec = ParamSpec.from_tensors(_named())
    data = spec.to_json()
    assert data[1] == {"name": "b", "shape": [2], "dtype": "float64", "offset": 6}
    assert ParamSpec.from_json(data) == spec
    assert ParamSpec.from_json(data).tensors[0].shape == (2, 3)
