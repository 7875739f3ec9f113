"""A deployed client's own state on its own disk, so that it survives a restart.

SCAFFOLD's control variate, FedDyn's gradient state, a personalised client's own model (and any
other tensor a :class:`~fedguard.client.app.ClientApp` keeps per client between rounds) are
client state: the server never holds it, so a client that restarts without it would start its
correction or its personal model from zero again (a FedDyn client whose state does not match
the server's record refuses to train). :class:`DiskState` is the
mapping the app keeps that state in, one safetensors file per client id in a folder of the
client's choosing (``--state-dir``). Each change is written atomically: a temporary file in the
same folder, created with mode 0600 (the state is derived from the client's data), flushed
and fsynced, then renamed over the old file, so a crash leaves the old state or the new one,
never a torn file. A file that cannot be read is refused with one line naming it, not skipped:
silently restarting from zero would change what the client sends.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

_NAME = re.compile(r"^client-(\d+)\.safetensors$")


class StateError(ValueError):
    """A state folder or file that cannot be used; the message names it."""


class DiskState(MutableMapping[int, dict[str, torch.Tensor]]):
    """Client id to its named state tensors, kept in ``folder`` (see the module docstring).

    Entries must be assigned whole (``state[cid] = {...}``); a change inside a returned dict
    is not written.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(
                f"--state-dir {self.folder}: cannot be created ({exc.strerror or exc})"
            ) from None
        if not self.folder.is_dir():
            raise StateError(f"--state-dir {self.folder}: is not a folder")
        self._entries: dict[int, dict[str, torch.Tensor]] = {}
        for path in sorted(self.folder.iterdir()):
            match = _NAME.match(path.name)
            if match is not None:
                self._entries[int(match.group(1))] = self._read(path)

    def path(self, client_id: int) -> Path:
        return self.folder / f"client-{client_id}.safetensors"

    @staticmethod
    def _read(path: Path) -> dict[str, torch.Tensor]:
        try:
            return dict(load_file(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise StateError(f"{path}: not a readable client state file ({exc})") from None

    def _write(self, client_id: int, tensors: dict[str, torch.Tensor]) -> None:
        target = self.path(client_id)
        tmp = target.with_name(f".{target.name}.tmp")
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an older temporary file may have had other bits
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)

    def __getitem__(self, client_id: int) -> dict[str, torch.Tensor]:
        return self._entries[client_id]

    def __setitem__(self, client_id: int, tensors: dict[str, torch.Tensor]) -> None:
        stored = {k: v.detach().clone() for k, v in tensors.items()}
        self._write(client_id, stored)
        self._entries[client_id] = stored

    def __delitem__(self, client_id: int) -> None:
        del self._entries[client_id]
        self.path(client_id).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
