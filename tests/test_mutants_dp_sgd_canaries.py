"""DP-SGD's white-box gradient canaries (a privacy audit's records whose clipped gradient is
``C e_c``) against a hand-written loop: the canaries' coins, positions and values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedguard.client import dp_sgd, training
from fedguard.models import torch_models
from fedguard.models.adapter import TorchModel


def _logistic() -> TorchModel:
    torch.manual_seed(4)
    return TorchModel(torch_models.logistic_regression((1, 6, 6), 3))  # weight [3, 36], bias [3]


def test_positions_and_additions_by_hand() -> None:
    model = _logistic()
    assert [(p.offset, p.numel) for p in model.trainable()] == [(0, 108), (108, 3)]
    positions = dp_sgd.canary_positions(model, torch.tensor([5, 109, 107, 0, 110]))
    assert [(j, int(p)) for j, p in positions] == [(0, 5), (1, 1), (0, 107), (0, 0), (1, 2)]
    sums = [torch.full((3, 36), 0.25), torch.full((3,), -0.5)]
    joined = torch.tensor([True, True, False, True, True])
    dp_sgd.add_gradient_canaries(sums, positions, joined, 0.7)
    weight = torch.full((3, 36), 0.25)
    weight.view(-1)[5] += 0.7
    weight.view(-1)[0] += 0.7
    torch.testing.assert_close(sums[0], weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(sums[1], torch.tensor([-0.5, 0.2, 0.2]), rtol=0, atol=1e-7)
    dp_sgd.add_gradient_canaries(sums, positions[:1], torch.tensor([True]), 0.7)
    assert float(sums[0].view(-1)[5]) == pytest.approx(0.25 + 1.4)
    with pytest.raises(ValueError):  # strict: one coin per canary
        dp_sgd.add_gradient_canaries(sums, positions, joined[:2], 0.7)
    for outside in (111, -1):
        with pytest.raises(ValueError, match="not in a trainable parameter"):
            dp_sgd.canary_positions(model, torch.tensor([outside]))


def _reference(module, x, y, coordinates, *, lr, q, clip, steps, seed):
    """Per step: the Poisson batch (``rand(n) < q``), then one coin per canary (``rand(M) <
    q``), the per-example gradients clipped to ``clip`` and summed, ``clip`` added at each
    sampled canary's flat coordinate, and ``p -= lr * sum / (q n)``."""
    g = torch.Generator().manual_seed(seed)
    params = list(module.parameters())
    n = int(y.shape[0])
    for _ in range(steps):
        idx = torch.nonzero(torch.rand(n, generator=g) < q).squeeze(1)
        coins = torch.rand(len(coordinates), generator=g) < q
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
        for i in idx.tolist():
            loss = F.nll_loss(torch.log_softmax(module(x[i : i + 1]), -1), y[i : i + 1])
            flat = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(loss, params)])
            total += flat.double() * min(1.0, clip / (float(flat.norm()) + 1e-6))
        for c, taken in zip(coordinates, coins.tolist(), strict=True):
            if taken:
                total[c] += clip
        with torch.no_grad():
            offset = 0
            for p in params:
                step = total[offset : offset + p.numel()].view(p.shape)
                p -= (lr * step / (q * n)).to(p.dtype)
                offset += p.numel()


@pytest.mark.parametrize("coordinates", [[7, 50, 109, 3], [50]])
def test_train_with_gradient_canaries_is_the_hand_written_loop(coordinates: list[int]) -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 1, 6, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    cfg = training.LocalTraining(lr=0.3, epochs=3, batch_size=4)  # q 0.4, 6 steps
    model = _logistic()
    reference = _logistic().module
    torch.manual_seed(123)  # the canaries' coins come from the task's generator, not torch's
    stats = dp_sgd.train(
        model,
        x,
        y,
        cfg,
        dp_sgd.DPSGD(0.9, 0.0),
        generator=torch.Generator().manual_seed(5),
        gradient_canaries=torch.tensor(coordinates),
    )
    _reference(reference, x, y, coordinates, lr=0.3, q=0.4, clip=0.9, steps=6, seed=5)
    assert stats.steps == 6 and stats.sampling_rate == 0.4  # what ran is reported unchanged
    for p, r in zip(model.module.parameters(), reference.parameters(), strict=True):
        assert float((p.detach() - r.detach()).abs().max()) < 1e-5
    without = _logistic()
    dp_sgd.train(
        without, x, y, cfg, dp_sgd.DPSGD(0.9, 0.0), generator=torch.Generator().manual_seed(5)
    )
    moved = (model.get_flat() - without.get_flat()).abs()
    assert float(moved[coordinates].min()) > 1e-3  # every canary was sampled and moved its own


def test_no_canaries_is_plain_dp_sgd() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 1, 6, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    cfg = training.LocalTraining(lr=0.3, epochs=2, batch_size=4)
    runs = []
    for canaries in (None, torch.zeros(0, dtype=torch.int64)):
        model = _logistic()
        dp_sgd.train(
            model,
            x,
            y,
            cfg,
            dp_sgd.DPSGD(0.9, 1.3),
            generator=torch.Generator().manual_seed(8),
            gradient_canaries=canaries,
        )
        runs.append(model.get_flat())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
