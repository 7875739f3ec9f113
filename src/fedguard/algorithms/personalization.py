"""The shared and personal parts of a flat parameter vector (FedRep, FedPer, fine-tuning).

Personalisation splits a model's parameters by name: the *head* (by default the model's last
layer; else the tensors whose names start with given prefixes) stays on the client, the *body*
is shared. Over the flat ``[D]`` vector of the round pipeline that split is a boolean mask; these
functions build it from a model's tensor names and apply it. Pure functions: names in, tensors
out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def last_layer_prefix(names: Sequence[str]) -> str:
    """The prefix of the last named tensor's layer: ``"fc2."`` for ``"fc2.bias"``, ``"net.6."``
    for ``"net.6.weight"`` (the whole name, for a tensor that sits in no layer)."""
    if not names:
        raise ValueError("A model without trainable tensors has no last layer.")
    layer, dot, _ = names[-1].rpartition(".")
    return f"{layer}{dot}" if dot else names[-1]


def name_mask(names: Sequence[str], sizes: Sequence[int], prefixes: Sequence[str]) -> torch.Tensor:
    """The boolean ``[D]`` mask, True over every tensor (of ``sizes`` elements each, laid out
    in ``names``' order) whose name starts with one of ``prefixes``."""
    if len(names) != len(sizes):
        raise ValueError(f"{len(names)} tensor names but {len(sizes)} sizes.")
    parts = [
        torch.full((int(n),), any(name.startswith(p) for p in prefixes), dtype=torch.bool)
        for name, n in zip(names, sizes, strict=True)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def combine(shared: torch.Tensor, personal: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``personal`` over the ``head`` positions, ``shared`` over the others (the model a client
    of FedRep or FedPer runs: the global body with its own head)."""
    return torch.where(head, personal, shared)


def body_only(update: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``update`` with every ``head`` position zero: the part of a client's update that is
    shared (a zero delta leaves the global head where it is)."""
    return update.masked_fill(head, 0.0)
