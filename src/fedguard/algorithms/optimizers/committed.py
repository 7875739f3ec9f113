"""Client state that moves only with an update the server aggregated (FedDyn's ``g_k``,
SCAFFOLD's control variate ``c_i``), both halves in one module.

Some strategies keep a server part that is the mean of a state every client keeps: FedDyn's
``h = (1/m) sum_k g_k``, SCAFFOLD's ``c = (1/N) sum_i c_i``. A client moves its state when it
trains and sends the change with its update; the server applies the changes of the replies it
aggregates. A client that trained and whose reply is then lost, or rejected, moved its state
although the server's part never received the change: had the client kept the new state, the
server's part would stay off the mean of the clients' states for the rest of the run (no later
round changes the offset).

So a client keeps the state of its last training *pending*, with the round it trained in,
beside the *committed* one, the state the server's part holds. The server records per client
the last round whose update entered its part (:func:`record_aggregated`, checkpointed with that
part) and tells each client its own in its next fit task (:func:`last_aggregated`). Before
training, the client settles its state (:func:`settle`): it commits the pending state if that
round is the one it trained in, and keeps the committed one if it is the committed one's; any
other round means that its state is not the one the server's part was built with, and it
refuses to train. So the server's part is the mean of the committed states after every round,
and a client that answers a round twice (a deployed client that restarts and fetches its open
task again) trains from the same state both times.

A state kept before this record existed (no rounds, no pending state) counts as committed in
round 0, which is what a server without the record (an older checkpoint) says of every client.
"""

from __future__ import annotations

import torch


def settle(
    committed: torch.Tensor | None,
    committed_round: int,
    pending: torch.Tensor | None,
    pending_round: int,
    aggregated_round: int,
    *,
    like: torch.Tensor,
    server_part: str,
    client_part: str,
) -> tuple[torch.Tensor, int]:
    """The client's state for a new round and the round whose aggregated update last moved it.

    ``committed`` is the state the server's part is known to hold (its last update entered that
    part in ``committed_round``; None and 0 before any: zeros shaped as ``like``), ``pending``
    the one trained in ``pending_round`` (None: none), ``aggregated_round`` the server's word:
    the last round whose update of this client entered its part (0: none). The pending state if
    that is the round it was trained in, the committed one if it is the committed round;
    ValueError for any other round, as the state is then not the one the server's part holds
    (a state lost or replaced, or a server resumed from an older checkpoint than its client).
    ``server_part`` and ``client_part`` name the two in that message."""
    if pending is not None and aggregated_round == pending_round:
        return pending, pending_round
    if aggregated_round == committed_round:
        return (torch.zeros_like(like) if committed is None else committed), committed_round
    held = f"round {committed_round}" + (
        f" (committed) and {pending_round} (pending)" if pending is not None else ""
    )
    raise ValueError(
        f"the server's {server_part} holds this client's update of round {aggregated_round}, "
        f"its {client_part} holds {held}; it is not the state the server's {server_part} was "
        "built with (a deployed client keeps its state with --state-dir)."
    )


def record_aggregated(record: torch.Tensor, client_ids: list[int], round_: int) -> torch.Tensor:
    """The server's record of the last round each client's update entered its part (``[n]``
    int64 by client id, 0: none; shorter when the highest ids never were), with ``client_ids``'
    updates of ``round_`` aggregated."""
    if any(c < 0 for c in client_ids):
        raise ValueError(f"Client ids must not be negative, got {sorted(client_ids)}.")
    size = max([record.numel(), *(c + 1 for c in client_ids)])
    out = torch.zeros(size, dtype=torch.int64)
    out[: record.numel()] = record.to(torch.int64)
    if client_ids:
        out[torch.tensor(client_ids, dtype=torch.int64)] = round_
    return out


def last_aggregated(record: torch.Tensor, client_id: int) -> int:
    """The last round whose update of ``client_id`` entered the server's part (0: none), from
    the record."""
    return int(record[client_id]) if 0 <= client_id < record.numel() else 0
