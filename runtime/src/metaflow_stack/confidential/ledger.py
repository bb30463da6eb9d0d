"""The CVMs this machine's launchers keep running, so that a launcher killed outright leaves none behind.

A CVM is billed until it is deleted. Ctrl-C or SIGTERM have its launcher
delete it; SIGKILL, a crash or a reboot do not. Phala's API keeps nothing
on a CVM that could name its launcher (the compose is the step's, the same
for every task), so each launcher notes its CVM and itself (this machine's
boot, its pid and start time) in the state folder, and drops the note once
the CVM is deleted. The note is written before the commit, naming the CVM
by its app (``PhalaCloud.by_app``: a provision's app has one CVM), so a
launcher killed while its commit is on the way leaves it noted too; once
committed, the CVM's own id replaces it. A run's start deletes the CVMs
whose launcher on this machine is gone (``Ledger.sweep``), as ``@nomad``
purges its jobs. A CVM noted on a machine lost for good is deleted in Phala
Cloud's dashboard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from metaflow_stack.confidential.phala import PhalaCloud, PhalaError
from metaflow_stack.elsewhere import Launcher
from metaflow_stack.local_secrets import keep


@dataclass(frozen=True)
class Launched:
    """One CVM that the launcher ``launcher`` (``elsewhere.Launcher.label``) keeps running: ``cvm`` is its id,
    or its app's (``PhalaCloud.by_app``) while it is being committed."""

    cvm: str
    name: str
    api: str
    launcher: str


class Ledger:
    """The notes in ``state_dir``, one file per CVM (by its API and name, which is the attempt's), each written
    whole (``local_secrets.keep``)."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "confidential" / "cvms"

    def launched(self, api: str, cvm: str, name: str) -> None:
        """Note that this process keeps the CVM ``name`` (``cvm``: its id, or its app's before the commit has
        answered) running on the API at ``api``."""
        note = Launched(cvm, name, api, Launcher.this().label)
        keep(self._note(api, name), json.dumps(asdict(note)))

    def deleted(self, api: str, name: str) -> None:
        self._note(api, name).unlink(missing_ok=True)

    def sweep(self, cloud: PhalaCloud) -> list[str]:
        """Delete the CVMs on ``cloud``'s API whose launcher on this machine is gone; their names. A note that
        does not read is dropped; a CVM Phala does not delete now stays noted for the next run's start."""
        swept = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                note = Launched(**json.loads(path.read_bytes()))
            except (OSError, ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            launcher = Launcher.parse(note.launcher)
            if note.api != cloud.base or launcher is None or not launcher.gone():
                continue
            try:
                cloud.delete(note.cvm, missing_ok=True)
            except PhalaError:
                continue
            path.unlink(missing_ok=True)
            swept.append(note.name)
        return swept

    def _note(self, api: str, name: str) -> Path:
        # Named by a digest: never a file name of the API's or a flow's choosing.
        return self.folder / f"{hashlib.sha256(f'{api} {name}'.encode()).hexdigest()[:32]}.json"
