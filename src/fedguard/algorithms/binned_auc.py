"""ROC AUC from score histograms, so that clients can report what a federated AUC needs.

The area under the ROC curve is the probability that a random positive example scores above a
random negative one, ties counting one half (Hanley and McNeil, Radiology 1982). It is a sum
over pairs, so it cannot be averaged from the clients' own AUCs; but it is a function of the
two score distributions, and histograms add. Each client bins the predicted probability of
every class ``c`` into ``B`` equal bins over ``[0, 1]``, separately for its examples of class
``c`` (positives) and of the other classes (negatives): an integer tensor ``[C, 2, B]``. The
server sums the clients' tensors and computes, per class,

    AUC_c = sum_b P[b] * (N[0..b-1] + N[b] / 2) / (sum P * sum N),

which is the exact AUC of scores rounded to their bin (pairs within one bin count as ties).
Two classes report the AUC of class 1 (what ``sklearn.metrics.roc_auc_score`` computes from
``p[:, 1]``), more classes the unweighted mean over classes of one-vs-rest AUCs (its
``multi_class="ovr"``). The error against the exact AUC is at most the share of
positive-negative pairs that fall in one bin; with ``B = 1000`` it is below 1e-3 on the
examples of this project.
"""

from __future__ import annotations

import torch

POSITIVE, NEGATIVE = 0, 1


def score_histograms(probabilities: torch.Tensor, y: torch.Tensor, bins: int) -> torch.Tensor:
    """The ``[C, 2, bins]`` int64 counts of ``probabilities`` ``[N, C]`` per class: row
    ``[c, 0]`` bins ``p_c`` of the examples labelled ``c``, row ``[c, 1]`` of the others."""
    if bins < 1:
        raise ValueError(f"The histograms need at least one bin, got {bins}.")
    if probabilities.ndim != 2 or y.shape != (probabilities.shape[0],):
        raise ValueError(
            f"Expected probabilities [N, C] and labels [N], got {tuple(probabilities.shape)} "
            f"and {tuple(y.shape)}."
        )
    n, classes = probabilities.shape
    index = (probabilities.double().clamp(0.0, 1.0) * bins).floor().long().clamp_max(bins - 1)
    out = torch.zeros(classes, 2, bins, dtype=torch.int64)
    for c in range(classes):
        positive = y == c
        out[c, POSITIVE] = torch.bincount(index[positive, c], minlength=bins)
        out[c, NEGATIVE] = torch.bincount(index[~positive, c], minlength=bins)
    return out


def auc_of_class(positive: torch.Tensor, negative: torch.Tensor) -> float | None:
    """The AUC of one class from its positive and negative histograms (bins in ascending score
    order, counts of any non-negative dtype); None without a positive or a negative example."""
    p, q = positive.double(), negative.double()
    total_p, total_q = float(p.sum()), float(q.sum())
    if not total_p > 0 or not total_q > 0:
        return None
    below = torch.cumsum(q, dim=0) - q  # negatives in lower bins
    return float((p * (below + 0.5 * q)).sum()) / (total_p * total_q)


def auc(histograms: torch.Tensor) -> float | None:
    """The AUC of summed ``[C, 2, B]`` histograms (see the module docstring); None when a class
    the AUC needs has no positive or no negative example (the AUC is undefined)."""
    if histograms.ndim != 3 or histograms.shape[1] != 2 or histograms.shape[0] < 2:
        raise ValueError(f"Expected histograms [C >= 2, 2, B], got {tuple(histograms.shape)}.")
    classes = histograms.shape[0]
    if classes == 2:
        return auc_of_class(histograms[1, POSITIVE], histograms[1, NEGATIVE])
    per_class = [
        auc_of_class(histograms[c, POSITIVE], histograms[c, NEGATIVE]) for c in range(classes)
    ]
    if any(a is None for a in per_class):
        return None
    return sum(a for a in per_class if a is not None) / classes
