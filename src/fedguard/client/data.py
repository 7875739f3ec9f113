"""A client's local data, as the client's trainer and evaluation see it.

Features are held as a tensor or made on demand (:class:`Rows`): a simulated federation of many
clients over a data set that can make any sample from its index (``data.synthetic_on_demand``)
keeps only each client's labels, and a client's features exist only while it trains or
evaluates. Either way ``train_x`` and ``eval_x`` read as tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Rows(Protocol):
    """Features made on demand: each call returns the same values as a new ``[n, ...]`` tensor.

    Nothing keeps the tensor: the caller holds it as long as it needs it. Implementations should
    be picklable (plain data and module-level code), so that the clients can be sent to another
    process.
    """

    def __call__(self) -> torch.Tensor: ...


class _Features:
    """A :class:`ClientData` field that holds a tensor, a :class:`Rows` or None and reads as the
    tensor (made by the ``Rows`` on every read) or None."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.slot = "_" + name

    def __get__(self, obj: object | None, owner: type | None = None) -> torch.Tensor | None:
        if obj is None:
            raise AttributeError(self.name)
        held = obj.__dict__[self.slot]
        return held() if callable(held) else held

    def __set__(self, obj: object, value: torch.Tensor | Rows | None) -> None:
        obj.__dict__[self.slot] = value


@dataclass(frozen=True, init=False, eq=False)
class ClientData:
    """A client's local data as tensors: its training data and its held-out data (``eval_*``;
    None: none).

    ``train_x`` and ``eval_x`` may be given as :class:`Rows`, features made on each read (the
    labels are always held, so sizes cost nothing): read them once per use and keep the tensor
    while it is needed. :func:`dataclasses.replace` works as on any dataclass (the copy holds
    the features it read). Two of them are equal only when they are the same object.

    ``own_eval``: the held-out data is the client's own (kept out of its training data, or
    from its own file), not its share of a central evaluation split that it holds in place of
    a split of its own. Only its own measures a personal model: a client whose held-out data
    is not its own answers a personal evaluation "no held-out data of its own"
    (:meth:`fedguard.client.app.ClientApp.evaluate`)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor | None
    eval_y: torch.Tensor | None
    own_eval: bool

    def __init__(
        self,
        train_x: torch.Tensor | Rows,
        train_y: torch.Tensor,
        eval_x: torch.Tensor | Rows | None = None,
        eval_y: torch.Tensor | None = None,
        own_eval: bool = True,
    ) -> None:
        # frozen: fields are set past the dataclass's own __setattr__, as its __init__ would
        object.__setattr__(self, "train_x", train_x)
        object.__setattr__(self, "train_y", train_y)
        object.__setattr__(self, "eval_x", eval_x)
        object.__setattr__(self, "eval_y", eval_y)
        object.__setattr__(self, "own_eval", own_eval)

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def on_demand(self) -> bool:
        """Whether the training features are made on each read rather than held."""
        return callable(self.__dict__["_train_x"])


# The features are descriptors set after the class is made, so that the dataclass sees plain
# fields (no defaults; __init__ above takes tensors or Rows) while every read and write, the
# dataclass's own included, goes through _Features.
for _name in ("train_x", "eval_x"):
    setattr(ClientData, _name, _Features(_name))
del _name
