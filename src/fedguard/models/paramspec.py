"""The parameter spec: how a model's named tensors map to one flat ``float32`` vector.

Every update that crosses the client/server boundary is a flat vector; the spec is the only place
that knows names, shapes, dtypes and offsets, so algorithms can work on ``[K, D]`` tensors and the
model adapters can put a vector back into a network of any framework.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeGuard

import torch


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of the model: where it lives in the flat vector and how to rebuild it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParamSpec:
    """Ordered tensor specs of a model; ``size`` is the length ``D`` of the flat vector."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def from_tensors(cls, named: Mapping[str, torch.Tensor]) -> ParamSpec:
        """Build the spec from named tensors, in the mapping's order."""
        specs, offset = [], 0
        for name, tensor in named.items():
            shape = tuple(int(d) for d in tensor.shape)
            specs.append(TensorSpec(name, shape, str(tensor.dtype).removeprefix("torch."), offset))
            offset += math.prod(shape)
        return cls(tuple(specs))

    @property
    def size(self) -> int:
        if not self.tensors:
            return 0
        last = self.tensors[-1]
        return last.offset + last.numel

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def flatten(self, named: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named tensors into one ``float32`` vector of length ``size``."""
        missing = [t.name for t in self.tensors if t.name not in named]
        if missing:
            raise KeyError(f"Tensors missing from the model state: {', '.join(missing[:5])}.")
        parts = []
        for t in self.tensors:
            value = named[t.name]
            if tuple(value.shape) != t.shape:
                raise ValueError(
                    f"Tensor {t.name!r} has shape {tuple(value.shape)}, the spec says {t.shape}."
                )
            parts.append(value.detach().reshape(-1).to(torch.float32))
        if not parts:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat(parts)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector back into named tensors of their original shapes and dtypes."""
        self.check_vector(flat)
        return {
            t.name: flat[t.offset : t.offset + t.numel].view(t.shape).to(getattr(torch, t.dtype))
            for t in self.tensors
        }

    def check_vector(self, flat: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``flat`` is a 1-D vector of length ``size``."""
        if flat.ndim != 1 or flat.shape[0] != self.size:
            raise ValueError(
                f"Expected a flat vector of {self.size} values, got shape {tuple(flat.shape)}."
            )

    def to_json(self) -> list[dict[str, object]]:
        return [
            {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "offset": t.offset}
            for t in self.tensors
        ]

    @classmethod
    def from_json(cls, data: list[dict[str, object]]) -> ParamSpec:
        """The spec that :meth:`to_json` wrote; ``ValueError`` for data of any other form."""
        return cls(tuple(_tensor_from_json(d) for d in data))


def _tensor_from_json(entry: dict[str, object]) -> TensorSpec:
    name, shape, dtype, offset = (entry.get(k) for k in ("name", "shape", "dtype", "offset"))
    if not isinstance(name, str) or not isinstance(dtype, str) or not _is_count(offset):
        raise ValueError(f"Not a tensor spec (name, shape, dtype, offset): {entry!r}.")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise ValueError(f"The shape of tensor {name!r} is not a list of sizes: {shape!r}.")
    return TensorSpec(name, tuple(int(n) for n in shape), dtype, int(offset))


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
