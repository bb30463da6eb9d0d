"""The CVMs this machine's launchers keep running, so that a launcher killed outright leaves none behind.

A CVM is billed until it is deleted. Ctrl-C or SIGTERM have its launcher
delete it; SIGKILL, a crash or a reboot do not. Phala's API keeps nothing
on a CVM that could name its launcher (the compose is the step's, the same
for every task), so each launcher notes its CVM and itself (this machine's
boot, its pid and start time) in the state folder as soon as the CVM is
committed, and drops the note once the CVM is deleted. A run's start
deletes the CVMs whose launcher on this machine is gone (``Ledger.sweep``),
as ``@nomad`` purges its jobs. A CVM committed in the instant before its
launcher was killed, or noted on a machine lost for good, is deleted in
Phala Cloud's dashboard.
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
    """One CVM that the launcher ``launcher`` (``elsewhere.Launcher.label``) keeps running."""

    cvm: str
    name: str
    api: str
    launcher: str


class Ledger:
    """The notes in ``state_dir``, one file per CVM, each written whole (``local_secrets.keep``)."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "confidential" / "cvms"

    def launched(self, api: str, cvm: str, name: str) -> None:
        """Note that this process keeps ``cvm`` (``name``) running on the API at ``api``."""
        note = Launched(cvm, name, api, Launcher.this().label)
        keep(self._note(api, cvm), json.dumps(asdict(note)))

    def deleted(self, api: str, cvm: str) -> None:
        self._note(api, cvm).unlink(missing_ok=True)

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

    def _note(self, api: str, cvm: str) -> Path:
        # Named by a digest: an id is the API's answer, never a file name of its choosing.
        return self.folder / f"{hashlib.sha256(f'{api} {cvm}'.encode()).hexdigest()[:32]}.json"
