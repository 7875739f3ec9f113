"""The parameter spec's JSON form: it round-trips, and anything else is refused by name."""

from __future__ import annotations

import pytest
import torch

from fedguard.models.paramspec import ParamSpec

SPEC = ParamSpec.from_tensors({"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.float64)})


def test_the_json_form_round_trips() -> None:
    assert ParamSpec.from_json(SPEC.to_json()) == SPEC
    assert ParamSpec.from_json(SPEC.to_json()).size == 9


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("name", 1, "Not a tensor spec"),
        ("dtype", None, "Not a tensor spec"),
        ("offset", "0", "Not a tensor spec"),
        ("offset", -1, "Not a tensor spec"),
        ("offset", True, "Not a tensor spec"),
        ("shape", "2,3", "not a list of sizes"),
        ("shape", [2, 3.0], "not a list of sizes"),
        ("shape", [2, -3], "not a list of sizes"),
    ],
)
def test_a_malformed_entry_is_a_value_error(field: str, value: object, problem: str) -> None:
    data = SPEC.to_json()
    data[0][field] = value
    with pytest.raises(ValueError, match=problem):
        ParamSpec.from_json(data)
    del data[0][field]
    with pytest.raises(ValueError, match=problem):
        ParamSpec.from_json(data)
