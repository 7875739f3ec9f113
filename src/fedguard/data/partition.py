"""Partitioners: which training samples each simulated client holds.

Every partitioner is a pure function returning one ``int64`` index array per client, sorted
ascending, that together cover every training sample exactly once with no client empty. Random
partitioners take a ``numpy.random.Generator`` and give the same result for the same generator
state.

- :func:`iid`: a uniformly random split into near-equal parts.
- :func:`dirichlet`: label skew with per-class client proportions ``p_c ~ Dir(alpha * 1_K)``
  (Hsu, Qi and Brown, "Measuring the effects of non-identical data distribution for federated
  visual classification", 2019). Small ``alpha`` gives each client few classes; large ``alpha``
  approaches :func:`iid`.
- :func:`shards`: sort by label, cut into ``K * s`` shards, deal ``s`` random shards per client
  (McMahan et al., "Communication-efficient learning of deep networks from decentralized data",
  AISTATS 2017).
- :func:`natural`: one client per value of a grouping column (a speaker, a hospital).
"""

from __future__ import annotations

import numpy as np

from fedguard.data.errors import PartitionError

METHODS = ("iid", "dirichlet", "shards", "natural")
MAX_DIRICHLET_REDRAWS = 100


def iid(num_samples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation of ``range(num_samples)`` cut into ``num_clients`` parts.

    Part sizes differ by at most one (the first ``num_samples % num_clients`` parts get one more).
    """
    _check_clients(num_samples, num_clients)
    return _sorted_parts(np.array_split(rng.permutation(num_samples), num_clients))


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label-skewed split: client ``k`` gets share ``p_{c,k}`` of class ``c``, ``p_c ~ Dir(alpha)``.

    For each class the shuffled samples are cut at ``floor(cumsum(p_c) * n_c)``. Proportions are
    redrawn (up to ``MAX_DIRICHLET_REDRAWS`` times) until every client holds at least ``min_size``
    samples; if no draw succeeds, the best one (largest smallest client) is kept and random samples
    are moved from the currently largest client to each client short of ``min_size``.
    """
    labels = _check_labels(labels)
    if not alpha > 0.0:
        raise PartitionError(
            f"alpha={alpha} is out of range: the Dirichlet concentration must be > 0."
        )
    if min_size < 1:
        raise PartitionError(f"min_size={min_size} is out of range: it must be at least 1.")
    _check_clients(labels.shape[0], num_clients)
    if labels.shape[0] < num_clients * min_size:
        raise PartitionError(
            f"num_clients={num_clients} with min_size={min_size} needs at least "
            f"{num_clients * min_size} training samples, but there are {labels.shape[0]}."
        )
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]

    def draw() -> np.ndarray:  # [classes, clients] sample counts
        return np.stack([_dirichlet_counts(len(idx), num_clients, alpha, rng) for idx in classes])

    best_counts = draw()
    best_min = int(best_counts.sum(axis=0).min())
    for _ in range(MAX_DIRICHLET_REDRAWS - 1):
        if best_min >= min_size:
            break
        counts = draw()
        smallest = int(counts.sum(axis=0).min())
        if smallest > best_min:
            best_counts, best_min = counts, smallest
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for idx, class_counts in zip(classes, best_counts, strict=True):
        pieces = np.split(rng.permutation(idx), np.cumsum(class_counts)[:-1])
        for client, piece in enumerate(pieces):
            parts[client].append(piece)
    merged = [np.concatenate(p) for p in parts]
    return _sorted_parts(_fill_small(merged, min_size, rng))


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: ``shards_per_client`` label-sorted shards each.

    Samples are shuffled, then stably sorted by label (so each shard is a random subset of its
    label range), and cut into ``num_clients * shards_per_client`` shards whose sizes differ by at
    most one. When every class size is a multiple of the shard size, each shard holds one label and
    each client at most ``shards_per_client`` labels.
    """
    labels = _check_labels(labels)
    if shards_per_client < 1:
        raise PartitionError(
            f"shards_per_client={shards_per_client} is out of range: it must be at least 1."
        )
    _check_clients(labels.shape[0], num_clients)
    num_shards = num_clients * shards_per_client
    if num_shards > labels.shape[0]:
        raise PartitionError(
            f"num_clients * shards_per_client={num_shards} exceeds the {labels.shape[0]} training "
            "samples: every shard needs at least one sample."
        )
    shuffled = rng.permutation(labels.shape[0])
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    cut = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _sorted_parts([np.concatenate([cut[s] for s in row]) for row in dealt])


def natural(groups: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """One client per distinct value of ``groups``, in sorted order of the value.

    Returns the index arrays and the group values as strings (the client names).
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.shape[0] == 0:
        raise PartitionError(
            f"groups must be a non-empty one-dimensional array, got shape {groups.shape}."
        )
    values, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    bounds = np.cumsum(np.bincount(inverse.reshape(-1), minlength=len(values)))[:-1]
    return _sorted_parts(np.split(order, bounds)), [str(v) for v in values]


def label_histogram(
    labels: np.ndarray, parts: list[np.ndarray], num_classes: int
) -> list[list[int]]:
    """Per client, the count of each class: ``out[k][c] = |{i in parts[k] : labels[i] = c}|``."""
    labels = _check_labels(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise PartitionError(
            f"num_classes={num_classes} does not cover the labels, which range from "
            f"{labels.min()} to {labels.max()}."
        )
    return [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]


def partition(
    method: str,
    labels: np.ndarray,
    *,
    num_clients: int,
    rng: np.random.Generator,
    alpha: float | None = None,
    shards_per_client: int | None = None,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Dispatch to the partitioner named ``method`` (one of ``METHODS``).

    ``alpha`` is required by ``"dirichlet"``, ``shards_per_client`` by ``"shards"`` and ``groups``
    by ``"natural"``, whose number of distinct groups must equal ``num_clients``.
    """
    labels = _check_labels(labels)
    if method == "iid":
        return iid(labels.shape[0], num_clients, rng)
    if method == "dirichlet":
        if alpha is None:
            raise PartitionError("alpha is required for the dirichlet partition: pass alpha > 0.")
        return dirichlet(labels, num_clients, alpha, rng)
    if method == "shards":
        if shards_per_client is None:
            raise PartitionError(
                "shards_per_client is required for the shards partition: pass an integer >= 1."
            )
        return shards(labels, num_clients, shards_per_client, rng)
    if method == "natural":
        if groups is None:
            raise PartitionError(
                "groups is required for the natural partition: the data set has no group column."
            )
        if np.asarray(groups).shape != labels.shape:
            raise PartitionError(
                f"groups has shape {np.asarray(groups).shape} but labels have shape "
                f"{labels.shape}: there must be one group per sample."
            )
        parts, _ = natural(groups)
        if len(parts) != num_clients:
            raise PartitionError(
                f"num_clients={num_clients} does not match the {len(parts)} groups of the natural "
                "partition: set num_clients to the number of groups."
            )
        return parts
    raise PartitionError(
        f"Unknown partition method {method!r}: choose one of {', '.join(METHODS)}."
    )


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` as a one-dimensional integer array."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError(
            f"labels must be a one-dimensional integer array, got shape {labels.shape} "
            f"and dtype {labels.dtype}."
        )
    return labels


def _check_clients(num_samples: int, num_clients: int) -> None:
    """Every client needs at least one sample."""
    if num_clients < 1:
        raise PartitionError(f"num_clients={num_clients} is out of range: it must be at least 1.")
    if num_samples < num_clients:
        raise PartitionError(
            f"num_clients={num_clients} exceeds the {num_samples} training samples: every client "
            "needs at least one sample."
        )


def _dirichlet_counts(
    count: int, num_clients: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """Split ``count`` samples over clients at ``floor(cumsum(p) * count)``, ``p ~ Dir(alpha)``."""
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    bounds = np.minimum(np.floor(np.cumsum(proportions) * count).astype(np.int64), count)
    bounds[-1] = count
    return np.diff(bounds, prepend=0)


def _fill_small(
    parts: list[np.ndarray], min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Move random samples from the largest client to each client short of ``min_size``.

    Terminates because the caller ensured ``sum(sizes) >= len(parts) * min_size``: while some
    client is short, the largest one holds more than ``min_size``.
    """
    parts = list(parts)
    for small in range(len(parts)):
        while len(parts[small]) < min_size:
            donor = int(np.argmax([len(p) for p in parts]))
            take = min(min_size - len(parts[small]), len(parts[donor]) - min_size)
            moved = rng.choice(len(parts[donor]), size=take, replace=False)
            parts[small] = np.concatenate([parts[small], parts[donor][moved]])
            parts[donor] = np.delete(parts[donor], moved)
    return parts


def _sorted_parts(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Each part as a sorted ``int64`` array."""
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
