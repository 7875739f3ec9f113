"""Model adapters: one interface over PyTorch modules and Keras 3 models.

A Keras 3 model on the torch backend is itself a ``torch.nn.Module`` whose weights are torch
parameters, so both frameworks share the training loops in :mod:`fedguard.client.training`; the
adapters only differ in how they name tensors, run the forward pass and read the output kind.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from fedguard.models.paramspec import ParamSpec


@dataclass(frozen=True)
class TrainableSlice:
    """A trainable parameter and where it sits in the flat vector."""

    param: torch.nn.Parameter
    offset: int
    numel: int


class ModelAdapter(abc.ABC):
    """What the client needs from a model: flat parameters in and out, and a forward pass."""

    spec: ParamSpec
    #: True when the model ends in a softmax (Keras style), False when it returns logits.
    outputs_probabilities: bool

    @abc.abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """The model's tensors (parameters and buffers), in spec order."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, *, training: bool) -> torch.Tensor:
        """Model outputs for a batch: logits, or probabilities if ``outputs_probabilities``."""

    @abc.abstractmethod
    def trainable(self) -> list[TrainableSlice]:
        """The parameters that receive gradients, with their offsets in the flat vector."""

    @abc.abstractmethod
    def train_mode(self, training: bool) -> None:
        """Switch layers such as dropout and batch norm between training and inference."""

    @property
    def module(self) -> torch.nn.Module:
        """The underlying module (a Keras model on the torch backend is one too)."""
        raise NotImplementedError

    def get_flat(self) -> torch.Tensor:
        """The model's current state as a flat ``float32`` vector."""
        parts = [t.detach().reshape(-1).to(torch.float32) for t in self.tensors()]
        return torch.cat(parts) if parts else torch.zeros(0)

    @torch.no_grad()
    def set_flat(self, flat: torch.Tensor) -> None:
        """Load a flat vector into the model, in place."""
        self.spec.check_vector(flat)
        for tensor, t in zip(self.tensors(), self.spec.tensors, strict=True):
            tensor.copy_(flat[t.offset : t.offset + t.numel].view(t.shape))

    def log_probabilities(self, x: torch.Tensor, *, training: bool) -> torch.Tensor:
        """Log class probabilities, whichever output kind the model has."""
        out = self.forward(x, training=training)
        if self.outputs_probabilities:
            return torch.log(out.clamp_min(1e-12))
        return torch.log_softmax(out, dim=-1)


class TorchModel(ModelAdapter):
    """Adapter for any ``torch.nn.Module`` returning class logits (all state_dict entries travel)."""

    def __init__(self, module: torch.nn.Module, *, outputs_probabilities: bool = False) -> None:
        self._module = module
        state = module.state_dict(keep_vars=True)
        self._tensors = [t for t in state.values()]
        self.spec = ParamSpec.from_tensors(state)
        self.outputs_probabilities = outputs_probabilities
        ids = {id(t): spec for t, spec in zip(self._tensors, self.spec.tensors, strict=True)}
        self._trainable = [
            TrainableSlice(p, ids[id(p)].offset, ids[id(p)].numel)
            for p in module.parameters()
            if p.requires_grad and id(p) in ids
        ]

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def tensors(self) -> list[torch.Tensor]:
        return self._tensors

    def trainable(self) -> list[TrainableSlice]:
        return self._trainable

    def forward(self, x: torch.Tensor, *, training: bool) -> torch.Tensor:
        return self._module(x)

    def train_mode(self, training: bool) -> None:
        self._module.train(training)
