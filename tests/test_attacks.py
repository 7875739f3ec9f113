"""Attacks: numbers by hand, the min-max/min-sum constraints, backdoor pixels, reproducible choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedguard.algorithms import attacks
from fedguard.algorithms.attacks import data_poisoning as attacks_data
from fedguard.algorithms.attacks import model_poisoning as attacks_model
from fedguard.algorithms.robust import base as robust_base

Perturbation = attacks_model.Perturbation


def honest(seed: int = 0, rows: int = 8, dim: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, dtype=torch.float64, generator=g) + 0.3


def test_sign_flip_boost_and_gaussian() -> None:
    own = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    assert attacks_model.sign_flip(own, scale=2.0).tolist() == [[-2.0, 4.0], [-1.0, -0.0]]
    assert attacks_model.boost(own, factor=10.0).tolist() == [[10.0, -20.0], [5.0, 0.0]]
    big = torch.zeros(4, 20_000)
    a = attacks_model.gaussian(big, std=3.0, generator=torch.Generator().manual_seed(1))
    b = attacks_model.gaussian(big, std=3.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (4, 20_000)
    assert float(a.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(a.std()) == pytest.approx(3.0, rel=0.02)


def test_alie_z_matches_the_paper_formula_by_hand() -> None:
    # n = 50, m = 12: s = floor(50/2 + 1) - 12 = 14, (n - s)/n = 36/50 = 0.72, Phi^-1(0.72) = 0.5828
    assert attacks_model.alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)
    # n = 10, m = 2: s = 6 - 2 = 4, 6/10 = 0.6, Phi^-1(0.6) = 0.2533
    assert attacks_model.alie_z(10, 2) == pytest.approx(0.2533, abs=1e-4)
    with pytest.raises(robust_base.RobustnessError, match="unbounded"):
        attacks_model.alie_z(10, 6)


def test_alie_is_mean_minus_z_std_per_coordinate() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)  # mean (2, 2), std (1, 2)
    out = attacks_model.alie(x, num_malicious=3, z=1.5)
    assert out.tolist() == [[0.5, -1.0]] * 3


def test_ipm_is_exactly_minus_epsilon_times_the_honest_mean() -> None:
    x = honest(1)
    out = attacks_model.inner_product_manipulation(x, num_malicious=2, epsilon=0.7)
    assert out.shape == (2, 6)
    assert torch.equal(out[0], -0.7 * x.mean(dim=0)) and torch.equal(out[1], out[0])


@pytest.mark.parametrize("kind", list(Perturbation))
def test_min_max_meets_its_constraint_with_a_maximal_gamma(kind: Perturbation) -> None:
    x, tol = honest(2), 1e-6
    bound = float(torch.cdist(x, x).max())
    direction = attacks_model.perturbation(x, kind)
    gamma = attacks_model.min_max_gamma(x, direction, tolerance=tol)
    out = attacks_model.min_max(x, num_malicious=3, kind=kind, tolerance=tol)
    assert out.shape == (3, 6) and gamma > 0
    assert torch.allclose(out[0], x.mean(dim=0) + gamma * direction)
    assert float(torch.cdist(out[:1], x).max()) <= bound * (1 + 1e-12)
    beyond = x.mean(dim=0) + (gamma + tol) * direction
    assert float(torch.cdist(beyond[None], x).max()) > bound


@pytest.mark.parametrize("kind", list(Perturbation))
def test_min_sum_meets_its_constraint_with_a_maximal_gamma(kind: Perturbation) -> None:
    x, tol = honest(3), 1e-6
    bound = float((torch.cdist(x, x) ** 2).sum(dim=1).max())
    direction = attacks_model.perturbation(x, kind)
    gamma = attacks_model.min_sum_gamma(x, direction, tolerance=tol)
    out = attacks_model.min_sum(x, num_malicious=1, kind=kind, tolerance=tol)

    def total(v: torch.Tensor) -> float:
        return float((torch.cdist(v[None], x) ** 2).sum())

    assert gamma > 0 and total(out[0]) <= bound * (1 + 1e-12)
    assert total(x.mean(dim=0) + (gamma + tol) * direction) > bound


def test_perturbation_directions() -> None:
    x = torch.tensor([[3.0, -1.0], [5.0, -3.0]], dtype=torch.float64)  # mean (4, -2), std (1, 1)
    unit = attacks_model.perturbation(x, Perturbation.UNIT_VECTOR)
    assert unit.tolist() == pytest.approx([-4.0 / 20**0.5, 2.0 / 20**0.5])
    assert attacks_model.perturbation(x, Perturbation.STD).tolist() == [-1.0, -1.0]
    assert attacks_model.perturbation(x, Perturbation.SIGN).tolist() == [-1.0, 1.0]


def test_poison_updates_dispatches_every_model_attack() -> None:
    x, own = honest(4, rows=8), honest(5, rows=2)
    for kind in attacks.Attack:
        cfg = attacks.AttackConfig(kind)
        if attacks.is_data_poisoning(kind):
            with pytest.raises(robust_base.RobustnessError, match="poisons training data"):
                attacks.poison_updates(cfg, x, own, generator=torch.Generator())
            continue
        out = attacks.poison_updates(cfg, x, own, generator=torch.Generator().manual_seed(0))
        assert out.shape == own.shape and bool(torch.isfinite(out).all())
    alie = attacks.poison_updates(
        attacks.AttackConfig(attacks.Attack.ALIE), x, own, generator=torch.Generator()
    )
    expected = attacks_model.alie(x, num_malicious=2, z=attacks_model.alie_z(10, 2))
    assert torch.equal(alie, expected)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_label_flipping(as_tensor: bool) -> None:
    y = np.array([0, 1, 2, 9, 5])
    labels = torch.from_numpy(y) if as_tensor else y
    flipped = attacks_data.flip_labels(labels, num_classes=10)
    assert list(flipped.tolist()) == [9, 8, 7, 0, 4]
    assert type(flipped) is type(labels)
    perm = attacks_data.flip_labels(labels[:3], num_classes=3, permutation=[1, 2, 0])
    assert list(perm.tolist()) == [1, 2, 0]
    with pytest.raises(robust_base.RobustnessError, match="permutation"):
        attacks_data.flip_labels(labels, num_classes=10, permutation=[0] * 10)


@pytest.mark.parametrize("layout", list(attacks_data.Layout))
@pytest.mark.parametrize("corner", list(attacks_data.Corner))
def test_backdoor_stamps_exactly_the_trigger_pixels(
    layout: attacks_data.Layout, corner: attacks_data.Corner
) -> None:
    g = torch.Generator().manual_seed(6)
    nchw = torch.rand(4, 3, 10, 12, generator=g) * 0.5
    images = nchw if layout is attacks_data.Layout.NCHW else nchw.permute(0, 2, 3, 1).contiguous()
    trigger = attacks_data.Trigger(size=3, corner=corner, margin=1, layout=layout)
    stamped = attacks_data.stamp_trigger(images, trigger)
    back = stamped if layout is attacks_data.Layout.NCHW else stamped.permute(0, 3, 1, 2)
    changed = (back != nchw).any(dim=(0, 1))  # [H, W]
    rows = {"top_left": (1, 4), "top_right": (1, 4), "bottom_left": (6, 9), "bottom_right": (6, 9)}
    cols = {
        "top_left": (1, 4),
        "top_right": (8, 11),
        "bottom_left": (1, 4),
        "bottom_right": (8, 11),
    }
    expected = torch.zeros(10, 12, dtype=torch.bool)
    expected[slice(*rows[corner.value]), slice(*cols[corner.value])] = True
    assert torch.equal(changed, expected)
    r, c = slice(*rows[corner.value]), slice(*cols[corner.value])
    assert bool((back[:, :, r, c] == float(nchw.max())).all())  # the data's maximum
    assert not torch.equal(images, stamped)  # a copy: the input is untouched


def test_backdoor_poisons_a_reproducible_fraction_and_numpy_works() -> None:
    images = np.zeros((10, 1, 6, 6), dtype=np.float32)
    labels = np.arange(10)
    trigger = attacks_data.Trigger(size=2, value=1.0)
    kwargs = {"trigger": trigger, "target": 7, "fraction": 0.3}
    out, y, idx = attacks_data.poison_backdoor(
        images, labels, generator=torch.Generator().manual_seed(0), **kwargs
    )
    _, _, idx_again = attacks_data.poison_backdoor(
        images, labels, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert idx == idx_again and len(idx) == 3
    assert y[idx].tolist() == [7, 7, 7]
    untouched = [i for i in range(10) if i not in idx]
    assert y[untouched].tolist() == untouched and float(out[untouched].sum()) == 0.0
    assert float(out[idx].sum()) == 3 * 4.0  # a 2x2 square of ones per poisoned image
    assert float(images.sum()) == 0.0


def test_attack_success_rate_ignores_images_of_the_target_class() -> None:
    labels = torch.tensor([0, 1, 2, 3, 3])
    predictions = torch.tensor([3, 3, 2, 3, 0])  # target 3: of labels 0, 1, 2, two hit
    assert attacks_data.attack_success_rate(predictions, labels, target=3) == pytest.approx(2 / 3)
    with pytest.raises(robust_base.RobustnessError, match="undefined"):
        attacks_data.attack_success_rate(labels, torch.full((3,), 3), target=3)


def test_choose_malicious_is_reproducible_and_sized() -> None:
    ids = list(range(100, 150))
    first = attacks.choose_malicious(ids, 0.2, seed=4)
    assert first == attacks.choose_malicious(list(reversed(ids)), 0.2, seed=4)
    assert len(first) == round(0.2 * 50) and first == sorted(first) and set(first) <= set(ids)
    assert attacks.choose_malicious(ids, 0.2, seed=5) != first
    assert len(attacks.choose_malicious(ids, 0.33, seed=4)) == round(0.33 * 50)
    assert attacks.choose_malicious(ids, 0.0, seed=4) == []
