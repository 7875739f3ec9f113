"""Distance-based selection: Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al. 2018).

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017, section 4: the score of update ``i`` is

    s(i) = sum over the K - f - 2 updates j != i closest to u_i of ||u_i - u_j||^2,

Krum returns the update of lowest score and Multi-Krum the average of the ``m`` lowest-scoring ones
(the paper suggests ``m = K - f``). Both need ``K > 2f + 2``.

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium",
ICML 2018, Algorithm 1 (Bulyan over Krum): select ``theta = K - 2f`` updates by applying Krum
repeatedly, each time removing the winner from the candidates; then, per coordinate, average the
``beta = theta - 2f`` selected values closest to the coordinate-wise median. Needs ``K >= 4f + 3``.

All distances come from one Gram product (``robust_gram``), so Krum costs one ``[K, D] x [D, K]``
matrix product plus ``O(K^2)`` work.
"""

from __future__ import annotations

import torch

from fedguard.algorithms.robust import base as robust_base
from fedguard.algorithms.robust import coordinate as robust_coordinate
from fedguard.algorithms.robust import gram as robust_gram


def krum_scores(sq_distances: torch.Tensor, *, neighbours: int) -> torch.Tensor:
    """Each row's sum of squared distances to its ``neighbours`` nearest other rows, float64 ``[K]``."""
    k = sq_distances.shape[0]
    if not 0 <= neighbours <= k - 1:
        raise robust_base.RobustnessError(
            f"A Krum score sums over 0..{k - 1} neighbours for K={k}; got {neighbours}."
        )
    others = sq_distances.clone()
    others.fill_diagonal_(float("inf"))
    return torch.topk(others, neighbours, dim=1, largest=False).values.sum(dim=1)


def krum_order(sq_distances: torch.Tensor, *, neighbours: int) -> torch.Tensor:
    """Row indices by increasing Krum score, ties broken by the sum of distances to all rows.

    With one neighbour, two mutual nearest neighbours always tie; breaking the tie by a property
    of the rows (not their position) keeps the selection independent of the order of the rows.
    """
    scores = krum_scores(sq_distances, neighbours=neighbours)
    by_total = torch.argsort(sq_distances.sum(dim=1), stable=True)
    return by_total[torch.argsort(scores[by_total], stable=True)]


def krum(updates: torch.Tensor, *, f: int) -> torch.Tensor:
    """The update with the lowest Krum score; needs ``K > 2f + 2``. Unweighted, as in the paper."""
    return krum_selecting(updates, f=f)[0]


def krum_selecting(updates: torch.Tensor, *, f: int) -> tuple[torch.Tensor, list[int]]:
    """:func:`krum` and the row it chose (a list of one): every other row is left out."""
    order = _order(updates, f, "Krum")
    chosen = int(order[0])
    return updates[chosen].clone(), [chosen]


def multi_krum(updates: torch.Tensor, weights: torch.Tensor, *, f: int, m: int) -> torch.Tensor:
    """Weighted mean of the ``m`` updates with the lowest Krum scores; needs ``K > 2f + 2``.

    Selection ignores the weights (a reported example count cannot buy a place); the selected
    updates are then averaged with their weights, renormalised over the selection.
    """
    return multi_krum_selecting(updates, weights, f=f, m=m)[0]


def multi_krum_selecting(
    updates: torch.Tensor, weights: torch.Tensor, *, f: int, m: int
) -> tuple[torch.Tensor, list[int]]:
    """:func:`multi_krum` and the ``m`` rows it averaged, by increasing Krum score."""
    order = _order(updates, f, "Multi-Krum")
    w = robust_base.normalised_weights(weights, updates.shape[0])
    if not 1 <= m <= updates.shape[0]:
        raise robust_base.RobustnessError(
            f"Multi-Krum averages m in 1..K updates; got m={m} with K={updates.shape[0]}."
        )
    chosen = order[:m]
    coefficients = torch.zeros_like(w)
    coefficients[chosen] = w[chosen]
    if not float(coefficients.sum()) > 0.0:
        raise robust_base.RobustnessError("Every update Multi-Krum selected has weight zero.")
    aggregate = robust_base.combine(coefficients / coefficients.sum(), updates)
    return aggregate, [int(i) for i in chosen]


def bulyan(updates: torch.Tensor, *, f: int) -> torch.Tensor:
    """Bulyan over Krum; needs ``K >= 4f + 3``. Unweighted, as in the paper.

    The repeated Krum uses ``max(n - f - 2, 1)`` neighbours for ``n`` remaining candidates: near
    the end of the selection ``n - f - 2`` drops below one and the paper's score is undefined.
    """
    return bulyan_selecting(updates, f=f)[0]


def bulyan_selecting(updates: torch.Tensor, *, f: int) -> tuple[torch.Tensor, list[int]]:
    """:func:`bulyan` and the ``theta = K - 2f`` rows its repeated Krum selected (the other
    ``2f`` rows take no part in its second, coordinate-wise step)."""
    robust_base.check_updates(updates)
    robust_base.check_f(f)
    k = updates.shape[0]
    if not k >= 4 * f + 3:
        raise robust_base.RobustnessError(
            f"Bulyan needs K >= 4f + 3 updates; got K={k} with f={f}."
        )
    sq_distances = robust_gram.distances_from_gram(robust_gram.centered_gram(updates).gram)
    selected = bulyan_selection(sq_distances, f=f)
    theta = len(selected)
    aggregate = robust_coordinate.mean_around_median(updates[selected], keep=theta - 2 * f)
    return aggregate, selected


def bulyan_selection(sq_distances: torch.Tensor, *, f: int) -> list[int]:
    """The ``theta = K - 2f`` row indices Bulyan's repeated Krum picks, in the order picked."""
    remaining = list(range(sq_distances.shape[0]))
    selected: list[int] = []
    for _ in range(sq_distances.shape[0] - 2 * f):
        if len(remaining) == 1:
            selected.append(remaining.pop())
            break
        idx = torch.tensor(remaining)
        sub = sq_distances[idx][:, idx]
        order = krum_order(sub, neighbours=max(len(remaining) - f - 2, 1))
        selected.append(remaining.pop(int(order[0])))
    return selected


def _order(updates: torch.Tensor, f: int, name: str) -> torch.Tensor:
    robust_base.check_updates(updates)
    robust_base.check_f(f)
    k = updates.shape[0]
    if not k > 2 * f + 2:
        raise robust_base.RobustnessError(f"{name} needs K > 2f + 2 updates; got K={k} with f={f}.")
    sq_distances = robust_gram.distances_from_gram(robust_gram.centered_gram(updates).gram)
    return krum_order(sq_distances, neighbours=k - f - 2)
