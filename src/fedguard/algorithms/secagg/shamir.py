"""Shamir secret sharing of byte strings over GF(2^31 - 1), vectorised with NumPy.

Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, section 3) shares each client's 32-byte self-mask seed and masking private
key with threshold ``t``: any ``t`` shares give the secret back, ``t - 1`` shares say nothing
about it. A secret is cut into 3-byte chunks (each below the prime ``p = 2^31 - 1``); every
chunk is the constant term of its own random polynomial of degree ``t - 1``. All polynomials of
all secrets are evaluated at all points in one array expression per degree (Horner's rule), and
Lagrange interpolation at 0 is one weighted sum, so the cost per share holder is a few array
operations, never a Python loop over chunks.

No intermediate overflows: field elements are below ``2^31``, so a product of two is below
``2^62`` and fits ``int64``; every product is reduced before the next addition, and a sum of
``t < 2^32`` reduced values stays below ``2^63``.

Randomness is passed in as a ``random_bytes(n)`` callable (``os.urandom`` in production): the
coefficients are 64-bit random words reduced modulo ``p``, whose bias (below ``2^-33``) is
negligible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

PRIME = 2**31 - 1
CHUNK_BYTES = 3  # 24-bit chunks: every chunk value is a field element
SHARE_DTYPE = np.dtype("<u4")  # a share chunk on the wire: little-endian uint32

RandomBytes = Callable[[int], bytes]


def num_chunks(secret_len: int) -> int:
    """Field elements needed for a secret of ``secret_len`` bytes."""
    return -(-secret_len // CHUNK_BYTES)


def _to_chunks(secrets: np.ndarray) -> np.ndarray:
    """``[S, L]`` uint8 secrets to ``[S, C]`` int64 field elements (big-endian 3-byte words)."""
    s, length = secrets.shape
    padded = np.zeros((s, num_chunks(length) * CHUNK_BYTES), dtype=np.int64)
    padded[:, :length] = secrets
    words = padded.reshape(s, -1, CHUNK_BYTES)
    return (words[..., 0] << 16) | (words[..., 1] << 8) | words[..., 2]


def _from_chunks(chunks: np.ndarray, secret_len: int) -> np.ndarray:
    """The inverse of :func:`_to_chunks`: ``[S, C]`` elements to ``[S, secret_len]`` uint8."""
    c = chunks.astype(np.int64)
    words = np.stack([(c >> 16) & 0xFF, (c >> 8) & 0xFF, c & 0xFF], axis=-1)
    return words.reshape(c.shape[0], -1)[:, :secret_len].astype(np.uint8)


def _random_elements(shape: tuple[int, ...], random_bytes: RandomBytes) -> np.ndarray:
    count = int(np.prod(shape))
    words = np.frombuffer(random_bytes(8 * count), dtype="<u8")
    return (words % np.uint64(PRIME)).astype(np.int64).reshape(shape)


def split(
    secrets: Sequence[bytes], points: Sequence[int], threshold: int, random_bytes: RandomBytes
) -> np.ndarray:
    """Shares of each secret at each point: ``[S, P, C]`` field elements (``C`` chunks).

    ``points`` are distinct non-zero x-coordinates (a share holder's public index); all secrets
    must have the same length. Share ``[s, i]`` goes to the holder at ``points[i]``.
    """
    if not secrets or len({len(s) for s in secrets}) != 1:
        raise ValueError("Shamir sharing needs one or more secrets of equal length.")
    xs = np.asarray(points, dtype=np.int64)
    if len(set(points)) != len(points) or bool(((xs <= 0) | (xs >= PRIME)).any()):
        raise ValueError(f"Share points must be distinct and in 1..{PRIME - 1}, got {points}.")
    if not 1 <= threshold <= len(points):
        raise ValueError(
            f"The threshold must be between 1 and the {len(points)} holders, got {threshold}."
        )
    raw = np.frombuffer(b"".join(secrets), dtype=np.uint8).reshape(len(secrets), -1)
    constant = _to_chunks(raw)  # [S, C]
    coefficients = _random_elements((threshold - 1, *constant.shape), random_bytes)
    x = xs[None, :, None]  # [1, P, 1]
    acc = np.zeros((constant.shape[0], xs.shape[0], constant.shape[1]), dtype=np.int64)
    for coefficient in coefficients[::-1]:  # Horner, highest degree first: t - 1 array steps
        acc = (acc * x + coefficient[:, None, :]) % PRIME
    return (acc * x + constant[:, None, :]) % PRIME


def _pow_mod(base: np.ndarray, exponent: int) -> np.ndarray:
    """``base ** exponent mod p`` element-wise (square and multiply over the exponent's bits)."""
    result = np.ones_like(base)
    b = base % PRIME
    while exponent:
        if exponent & 1:
            result = (result * b) % PRIME
        b = (b * b) % PRIME
        exponent >>= 1
    return result


def _prod_mod(values: np.ndarray, axis: int) -> np.ndarray:
    """The product along ``axis`` modulo ``p``, reducing after every factor."""
    moved = np.moveaxis(values, axis, 0)
    out = np.ones(moved.shape[1:], dtype=np.int64)
    for factor in moved:
        out = (out * factor) % PRIME
    return out


def lagrange_at_zero(points: Sequence[int] | np.ndarray) -> np.ndarray:
    """Coefficients ``l_i = prod_{j != i} x_j / (x_j - x_i) mod p`` so that ``f(0) = sum l_i y_i``.

    ``points`` is one set ``[T]`` (coefficients ``[T]``) or a batch ``[G, T]`` of sets, one per
    row (coefficients ``[G, T]``): the batch costs one modular exponentiation for all rows.
    """
    xs = np.asarray(points, dtype=np.int64)
    rows = xs.reshape(-1, xs.shape[-1])  # [G, T]
    ordered = np.sort(rows, axis=1)
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError(f"Interpolation points must be distinct, got {xs.tolist()}.")
    t = rows.shape[1]
    diff = (rows[:, None, :] - rows[:, :, None]) % PRIME  # [g, i, j] = x_j - x_i
    diagonal = np.eye(t, dtype=bool)[None]
    numer = np.where(diagonal, 1, rows[:, None, :])
    diff[:, diagonal[0]] = 1
    weights = (_prod_mod(numer, 2) * _pow_mod(_prod_mod(diff, 2), PRIME - 2)) % PRIME
    return weights.reshape(xs.shape)


def reconstruct(
    points: Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
    shares: np.ndarray,
    secret_len: int,
) -> list[bytes]:
    """The secrets behind ``shares [S, T, C]`` (Lagrange at 0), held at ``points``: ``[T]`` for
    all secrets, or ``[S, T]``, each secret's own holders (one batched interpolation).

    With at least ``threshold`` shares the result is the shared secret; with fewer it is an
    unrelated value (nothing in the arithmetic can tell, which is the point of the scheme).
    """
    shares = np.asarray(shares, dtype=np.int64)
    xs = np.asarray(points, dtype=np.int64)
    if shares.ndim != 3 or xs.shape not in ((shares.shape[1],), shares.shape[:2]):
        raise ValueError(
            f"Expected shares [S, T, C] held at points [T] or [S, T], got shares of shape "
            f"{tuple(shares.shape)} at points of shape {tuple(xs.shape)}."
        )
    weights = np.broadcast_to(lagrange_at_zero(xs), shares.shape[:2])
    chunks = ((shares * weights[:, :, None]) % PRIME).sum(axis=1) % PRIME
    return [row.tobytes() for row in _from_chunks(chunks, secret_len)]


def share_to_bytes(share: np.ndarray) -> bytes:
    """One holder's share of one secret (``[C]`` elements) as little-endian uint32 words."""
    return np.asarray(share, dtype=SHARE_DTYPE).tobytes()


def share_from_bytes(data: bytes, secret_len: int) -> np.ndarray:
    """The inverse of :func:`share_to_bytes`; refuses a share of the wrong size or range."""
    return shares_from_bytes([[data]], secret_len)[0, 0]


def shares_from_bytes(rows: Sequence[Sequence[bytes]], secret_len: int) -> np.ndarray:
    """:func:`share_from_bytes` for ``S`` secrets with ``T`` shares each: ``[S, T, C]`` elements,
    parsed in one pass."""
    expected = num_chunks(secret_len) * SHARE_DTYPE.itemsize
    flat = [share for row in rows for share in row]
    wrong = next((len(share) for share in flat if len(share) != expected), None)
    if wrong is not None:
        raise ValueError(
            f"A share of a {secret_len}-byte secret has {expected} bytes, got {wrong}."
        )
    if len({len(row) for row in rows}) > 1:
        raise ValueError("Every secret needs the same number of shares.")
    values = np.frombuffer(b"".join(flat), dtype=SHARE_DTYPE).astype(np.int64)
    if bool((values >= PRIME).any()):
        raise ValueError("A share holds a value outside the field.")
    return values.reshape(len(rows), -1, num_chunks(secret_len))
