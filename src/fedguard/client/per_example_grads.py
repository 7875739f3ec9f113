"""Per-example gradients, clipped and summed: the engines under DP-SGD (:mod:`fedguard.client.dp_sgd`).

A DP-SGD step needs, for a batch, the sum of each example's gradient clipped to norm ``C`` (and
the norms, to report). :func:`per_example_clipper` picks an engine for the model:

- book-keeping (Bu et al. 2023, "Differentially private optimization on large model at small
  cost"): forward hooks keep each ``Linear``/``Conv1d``/``Conv2d`` layer's input ``A``; one
  ``autograd.grad`` of the summed loss with respect to the layers' outputs gives their output
  gradients ``G`` (and skips the weight gradients, which are never needed unclipped). A layer's
  per-example weight gradient is ``G_i A_i^T``: its norm comes from the ghost norm
  ``sum (A_i^T A_i) * (G_i^T G_i)`` or from the materialised ``[B, out, in]`` gradients,
  whichever costs fewer multiplications, and the clipped sum from one more contraction. No second
  backward pass, no per-example loop.
- ``torch.func`` for any other module that owns trainable parameters (GroupNorm, LayerNorm,
  Embedding, user layers): ``vmap(grad(per-example loss))`` over the batch, then the same clip.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedguard.models.adapter import ModelAdapter, TorchModel, TrainableSlice

CLIP_EPSILON = 1e-6
VMAP_CHUNK = 64
_HOOKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
_Hookable = nn.Linear | nn.Conv1d | nn.Conv2d


class GradientMethod(enum.StrEnum):
    """How per-example gradients are computed (``auto``: hooks where the model allows)."""

    AUTO = "auto"
    HOOKS = "hooks"
    VMAP = "vmap"


@dataclass(frozen=True)
class ClippedBatch:
    """A batch's sum of clipped per-example gradients, before noise.

    ``grads`` follow ``model.trainable()``; ``norms`` are the per-example gradient norms before
    clipping and ``factors`` the clip factors ``min(1, C / (norm + 1e-6))``; ``loss_sum`` is the
    sum of the per-example losses (reported, never released privately).
    """

    grads: list[torch.Tensor]
    norms: torch.Tensor
    factors: torch.Tensor
    loss_sum: torch.Tensor


ClipFn = Callable[[torch.Tensor, torch.Tensor, float], ClippedBatch]


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, C / (norm + 1e-6))`` per example (1 everywhere when ``C`` is infinite)."""
    return (max_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)


def _empty_batch(slices: list[TrainableSlice]) -> ClippedBatch:
    """An empty Poisson batch: zero sums (the step is noise only)."""
    empty = torch.zeros(0)
    return ClippedBatch([torch.zeros_like(s.param) for s in slices], empty, empty, torch.zeros(()))


def per_example_losses(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """NLL of each example, ``[B]``, with the model in training behaviour."""
    return F.nll_loss(model.log_probabilities(x, training=True), y, reduction="none")


# --- Per-example clipping: selection -------------------------------------------------------


@contextlib.contextmanager
def per_example_clipper(
    model: ModelAdapter, method: GradientMethod = GradientMethod.AUTO
) -> Iterator[ClipFn]:
    """A function ``(x, y, C) -> ClippedBatch`` for ``model``; hooks are removed on exit.

    ``auto`` uses the hooks when every trainable parameter belongs to a hookable layer and
    switches to vmap for good if a forward pass does something hooks cannot follow (a layer
    called twice, an input changed in place); ``hooks`` raises ValueError instead.
    """
    method = GradientMethod(method)
    layers = None if method is GradientMethod.VMAP else _hookable_layers(model)
    if layers is None:
        if method is GradientMethod.HOOKS:
            raise ValueError("This model has trainable parameters outside Linear/Conv layers.")
        yield lambda x, y, c: _vmap_clipped_sum(model, x, y, c)
        return
    clipper = _HookClipper(model, layers, fallback=method is GradientMethod.AUTO)
    try:
        yield clipper
    finally:
        clipper.close()


@dataclass(frozen=True)
class _Layer:
    """A hookable layer and the indices (in ``model.trainable()``) of its trainable tensors."""

    module: _Hookable
    weight: int | None
    bias: int | None


def _hookable_layers(model: ModelAdapter) -> list[_Layer] | None:
    """The layers that own all trainable parameters, or None if any sits elsewhere or is tied.

    The hooks see a parameter only through its layer's forward: a weight that the model also
    reads directly (``F.linear(h, self.fc.weight)``) loses that part of its gradient. The update
    stays private (it is still a sum of clipped per-example terms), but it is not SGD's.
    """
    if not isinstance(model, TorchModel):
        return None
    index = {id(s.param): i for i, s in enumerate(model.trainable())}
    layers: list[_Layer] = []
    seen: set[int] = set()
    for module in model.module.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in index]
        if not own:
            continue
        # exactly these classes: a subclass may compute something else in its forward
        if not isinstance(module, _HOOKABLE) or type(module) not in _HOOKABLE:
            return None
        if not _plain(module):
            return None
        if any(id(p) in seen for p in own):
            return None
        seen.update(id(p) for p in own)
        bias = None if module.bias is None else index.get(id(module.bias))
        layers.append(_Layer(module, index.get(id(module.weight)), bias))
    return layers if len(seen) == len(index) else None


def _plain(module: _Hookable) -> bool:
    """Convolutions the unfold formulas cover: one group, zero padding given as numbers."""
    if isinstance(module, nn.Linear):
        return True
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


# --- Per-example clipping: book-keeping hooks ----------------------------------------------


class _Unsupported(Exception):
    """A forward pass the hooks cannot follow."""


@dataclass
class _Record:
    """One call of a hooked layer: its input activation and output, with their versions."""

    activation: torch.Tensor
    activation_version: int
    output: torch.Tensor
    output_version: int


class _HookClipper:
    """Book-keeping clipping (Bu et al. 2023): norms from layer inputs and output gradients."""

    def __init__(self, model: ModelAdapter, layers: list[_Layer], *, fallback: bool) -> None:
        self._model = model
        self._layers = layers
        self._fallback = fallback
        self._records: dict[nn.Module, list[_Record]] = {}
        # Set once a layer's output was changed in place (e.g. ReLU(inplace=True)): from then on
        # the hooks hand the model a copy, so the recorded output keeps its own gradient.
        self._copy_outputs = False
        self._handles = [layer.module.register_forward_hook(self._record) for layer in layers]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records.clear()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, max_norm: float) -> ClippedBatch:
        if not self._handles:
            return _vmap_clipped_sum(self._model, x, y, max_norm)
        try:
            return self._clipped_sum(x, y, max_norm)
        except _Unsupported as err:
            if not self._fallback:
                raise ValueError(f"The hooks cannot follow this model: {err}.") from err
            self.close()
            return _vmap_clipped_sum(self._model, x, y, max_norm)
        finally:
            self._records.clear()

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not args or not isinstance(output, torch.Tensor):
            raise _Unsupported(f"{type(module).__name__} was called without a positional input")
        a = args[0]
        self._records.setdefault(module, []).append(
            _Record(a.detach(), a._version, output, output._version)
        )
        return output.clone() if self._copy_outputs else None

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example losses with every hooked layer recorded once; copies outputs if needed."""
        self._records.clear()
        losses = per_example_losses(self._model, x, y)
        if self._outputs_changed() and not self._copy_outputs:
            self._copy_outputs = True
            self._records.clear()
            losses = per_example_losses(self._model, x, y)
        problem = self._problem()
        if problem is not None:
            raise _Unsupported(problem)
        return losses

    def _outputs_changed(self) -> bool:
        return any(
            r.output._version != r.output_version for rs in self._records.values() for r in rs
        )

    def _problem(self) -> str | None:
        """Why the records cannot give per-example gradients, or None."""
        for module, records in self._records.items():
            name = type(module).__name__
            if len(records) != 1:
                return f"{name} was called {len(records)} times in one forward pass"
            r = records[0]
            if r.activation._version != r.activation_version:
                return f"the input of a {name} was changed in place"
            if r.output._version != r.output_version:
                return f"the output of a {name} was changed in place"
            if not r.output.requires_grad:
                return f"a {name} ran without autograd"
        return None

    def _clipped_sum(self, x: torch.Tensor, y: torch.Tensor, max_norm: float) -> ClippedBatch:
        slices = self._model.trainable()
        b = int(x.shape[0])
        if b == 0:
            return _empty_batch(slices)
        losses = self._forward(x, y)
        called = [layer for layer in self._layers if layer.module in self._records]
        outputs = [self._records[layer.module][0].output for layer in called]
        output_grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        books = [
            _layer_book(layer, self._records[layer.module][0].activation, g)
            for layer, g in zip(called, output_grads, strict=True)
            if g is not None
        ]
        sq_norms = losses.new_zeros(b)
        for book in books:
            sq_norms += book.sq_norms
        norms = sq_norms.sqrt()
        factors = clip_factors(norms, max_norm)
        grads: list[torch.Tensor | None] = [None] * len(slices)
        for book in books:
            for i, g in book.sums(factors):
                grads[i] = g.view_as(slices[i].param)
        # Parameters of layers the loss did not reach get no gradient: zero before noise.
        filled = [
            torch.zeros_like(s.param) if g is None else g
            for s, g in zip(slices, grads, strict=True)
        ]
        return ClippedBatch(filled, norms, factors, losses.detach().sum())


@dataclass(frozen=True)
class _Book:
    """One layer's per-example squared gradient norms and its clipped sums given clip factors."""

    sq_norms: torch.Tensor
    sums: Callable[[torch.Tensor], list[tuple[int, torch.Tensor]]]


def _layer_book(layer: _Layer, activation: torch.Tensor, output_grad: torch.Tensor) -> _Book:
    """Bring a layer to ``A [B, in, T]``, ``G [B, out, T]`` (or 2-D when ``T = 1``) and book it."""
    module = layer.module
    b = output_grad.shape[0]
    if isinstance(module, nn.Linear):
        if activation.ndim == 2:
            return _dense_book(layer, activation, output_grad)
        a = activation.reshape(b, -1, activation.shape[-1]).transpose(1, 2)
        g = output_grad.reshape(b, -1, output_grad.shape[-1]).transpose(1, 2)
    else:
        a = _unfold(module, activation)
        g = output_grad.reshape(b, output_grad.shape[1], -1)
    return _sequence_book(layer, a, g)


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A 2-D convolution's (height, width) setting."""
    return values[0], values[1]


def _unfold(conv: nn.Conv1d | nn.Conv2d, activation: torch.Tensor) -> torch.Tensor:
    """The im2col patches ``[B, C_in * kh * kw, T]`` of a convolution's input (1-D as height 1).

    Equal to ``F.unfold``, built as a strided view and one copy, which is several times faster
    on CPU than the im2col kernel behind ``F.unfold``.
    """
    pad = conv.padding
    if isinstance(pad, str):  # _plain() admits only padding given as numbers
        raise ValueError(f"Cannot unfold a convolution with padding={pad!r}.")
    if isinstance(conv, nn.Conv1d):
        x, kernel = activation.unsqueeze(2), (1, conv.kernel_size[0])
        dilation, padding, stride = (1, conv.dilation[0]), (0, pad[0]), (1, conv.stride[0])
    else:
        x, kernel = activation, _pair(conv.kernel_size)
        dilation, padding, stride = _pair(conv.dilation), _pair(pad), _pair(conv.stride)
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    b, c, h, w = x.shape
    out_h = (h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    s_b, s_c, s_h, s_w = x.stride()
    patches = x.as_strided(
        (b, c, kernel[0], kernel[1], out_h, out_w),
        (s_b, s_c, dilation[0] * s_h, dilation[1] * s_w, stride[0] * s_h, stride[1] * s_w),
    )
    return patches.reshape(b, c * kernel[0] * kernel[1], out_h * out_w)


def _dense_book(layer: _Layer, a: torch.Tensor, g: torch.Tensor) -> _Book:
    """``A [B, in]``, ``G [B, out]``: ``||G_i A_i^T||^2 = ||G_i||^2 ||A_i||^2`` (ghost norm)."""
    g_sq = g.square().sum(1)
    sq = g_sq * a.square().sum(1) if layer.weight is not None else torch.zeros_like(g_sq)
    if layer.bias is not None:
        sq = sq + g_sq

    def sums(c: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        cg = g * c.unsqueeze(1)
        out = [] if layer.weight is None else [(layer.weight, cg.T @ a)]
        return out if layer.bias is None else [*out, (layer.bias, cg.sum(0))]

    return _Book(sq, sums)


def _sequence_book(layer: _Layer, a: torch.Tensor, g: torch.Tensor) -> _Book:
    """``A [B, in, T]``, ``G [B, out, T]``: ghost norm or explicit per-example gradients.

    The ghost norm ``sum (A_i^T A_i) * (G_i^T G_i)`` costs ``B T^2 (in + out)`` multiplications,
    the per-example gradients ``G_i A_i^T`` cost ``B T in out``: take the cheaper one.
    """
    b, d_in, t = a.shape
    d_out = g.shape[1]
    bias = g.sum(2) if layer.bias is not None else None
    sq = bias.square().sum(1) if bias is not None else g.new_zeros(b)
    per_example = None
    if layer.weight is not None:
        if t * (d_in + d_out) < d_in * d_out:
            gram_a = torch.bmm(a.transpose(1, 2), a)
            gram_g = torch.bmm(g.transpose(1, 2), g)
            sq = sq + (gram_a * gram_g).sum((1, 2))
        else:
            per_example = torch.bmm(g, a.transpose(1, 2)).reshape(b, -1)
            sq = sq + torch.linalg.vector_norm(per_example, dim=1).square()

    def sums(c: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        out = []
        if layer.weight is not None:
            if per_example is not None:
                out.append((layer.weight, c @ per_example))
            else:
                out.append((layer.weight, torch.einsum("bot,bkt->ok", g * c.view(b, 1, 1), a)))
        if bias is not None and layer.bias is not None:  # both or neither
            out.append((layer.bias, c @ bias))
        return out

    return _Book(sq, sums)


# --- Per-example clipping: torch.func fallback ---------------------------------------------


class LogProbs(nn.Module):
    """The adapter's log-probabilities as a module, so ``functional_call`` can swap its weights."""

    def __init__(self, model: ModelAdapter) -> None:
        super().__init__()
        self.inner = model.module
        self._adapter = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._adapter.log_probabilities(x, training=True)


@contextlib.contextmanager
def kept_parameters(module: nn.Module) -> Iterator[None]:
    """Put ``module``'s own parameters back after the block: ``functional_call`` restores a
    submodule reached by two paths (a layer used twice) with the swapped-in tensor instead of
    its parameter (torch 2.13)."""
    saved = [(m, dict(m._parameters)) for m in module.modules()]
    try:
        yield
    finally:
        for m, originals in saved:
            m._parameters.update(originals)


def _vmap_clipped_sum(
    model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, max_norm: float
) -> ClippedBatch:
    """``vmap(grad(per-example loss))`` in chunks of ``VMAP_CHUNK`` examples, then the same clip."""
    slices = model.trainable()
    if int(x.shape[0]) == 0:
        return _empty_batch(slices)
    sums = [torch.zeros_like(s.param) for s in slices]
    per_example = _per_example_grad_fn(model)
    norms, factors, loss_sum = [], [], torch.zeros(())
    for xc, yc in zip(x.split(VMAP_CHUNK), y.split(VMAP_CHUNK), strict=True):
        grads, losses = per_example(xc, yc)
        sq = sum(torch.linalg.vector_norm(g.flatten(1), dim=1).square() for g in grads)
        norm = sq.sqrt()
        c = clip_factors(norm, max_norm)
        for s, g in zip(sums, grads, strict=True):
            s.add_((c @ g.flatten(1)).view_as(s))
        norms.append(norm)
        factors.append(c)
        loss_sum = loss_sum + losses.detach().sum()
    return ClippedBatch(sums, torch.cat(norms), torch.cat(factors), loss_sum)


def _per_example_grad_fn(
    model: ModelAdapter,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]:
    """``(x [B, ...], y [B]) -> (per-example grads [B, *shape] per trainable, losses [B])``."""
    wrapper = LogProbs(model)
    names = {id(p): name for name, p in wrapper.named_parameters()}
    order = [names[id(s.param)] for s in model.trainable()]
    params = {name: s.param.detach() for name, s in zip(order, model.trainable(), strict=True)}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        log_probs = torch.func.functional_call(wrapper, p, (xi.unsqueeze(0),))
        return F.nll_loss(log_probs, yi.unsqueeze(0), reduction="sum")

    batched = torch.func.vmap(
        torch.func.grad_and_value(loss), in_dims=(None, 0, 0), randomness="different"
    )

    def per_example(x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        with kept_parameters(wrapper):
            grads, losses = batched(params, x, y)
        return [grads[name] for name in order], losses

    return per_example
