"""The CVMs this machine's launchers keep running, so that a launcher killed outright leaves none behind.

A CVM is billed until it is deleted. Ctrl-C or SIGTERM have its launcher
delete it; SIGKILL, a crash or a reboot do not. Phala's API keeps nothing
on a CVM that could name its launcher (the compose is the step's, the same
for every task), so each launcher notes its CVM and itself (this machine's
boot, its pid and start time) in the state folder, and drops the note once
the CVM is deleted. The note is written just before the commit (its
variable key checked first), naming the CVM by its app
(``PhalaCloud.by_app``: a provision's app has one CVM), so a launcher
killed while its commit is on the way leaves it noted too; once
committed, the CVM's own id replaces it. A launcher killed outright has a
child it forked first delete its committed CVM at once (``Ledger.left_by``,
through ``trampolines.undone_if_killed``); a run's start deletes the CVMs
whose launcher on this machine is gone (``Ledger.sweep``), as ``@nomad``
purges its jobs: those the child could not, and those noted by their app
(a commit may still be making the CVM as the launcher dies). A CVM noted on
a machine lost for good is deleted in Phala Cloud's dashboard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from metaflow_stack.confidential.phala import APP_PREFIX, PhalaCloud, PhalaError
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
    """The notes in ``state_dir``, one file per CVM (by its API and its app, which is the provision's and the
    same before and after its commit), each written whole (``local_secrets.keep``)."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "confidential" / "cvms"

    def launched(self, api: str, app_id: str, cvm: str, name: str) -> None:
        """Note that this process keeps the CVM ``name`` of the app ``app_id`` (``cvm``: its id, or its app's
        before the commit has answered) running on the API at ``api``."""
        note = Launched(cvm, name, api, Launcher.this().label)
        keep(self._note(api, app_id), json.dumps(asdict(note)))

    def deleted(self, api: str, app_id: str) -> None:
        self._note(api, app_id).unlink(missing_ok=True)

    def sweep(self, cloud: PhalaCloud) -> tuple[list[str], list[str]]:
        """Delete the CVMs on ``cloud``'s API whose launcher on this machine is gone: the names of those
        deleted, and of those Phala did not delete now (they stay noted, for the next run's start). A note
        that does not read is dropped, and so is one by app whose app has no CVM (its commit never made one)."""
        return self._delete(
            cloud, lambda note: (launcher := Launcher.parse(note.launcher)) is not None and launcher.gone()
        )

    def left_by(self, cloud: PhalaCloud, launcher: str) -> tuple[list[str], list[str]]:
        """Delete the committed CVMs the launcher labelled ``launcher`` noted, as ``sweep`` does, once it was
        killed outright. Those noted by their app are left to the next run's sweep: the commit the launcher
        sent may still be making the CVM, and a look now that found none would drop its note."""
        return self._delete(cloud, lambda note: note.launcher == launcher and not note.cvm.startswith(APP_PREFIX))

    def _delete(self, cloud: PhalaCloud, chosen: Callable[[Launched], bool]) -> tuple[list[str], list[str]]:
        swept, left = [], []
        for path in sorted(self.folder.glob("*.json")):
            try:
                note = Launched(**json.loads(path.read_bytes()))
            except (OSError, ValueError, TypeError):
                path.unlink(missing_ok=True)
                continue
            if note.api != cloud.base or not chosen(note):
                continue
            try:
                found = cloud.delete(note.cvm, missing_ok=True)
            except PhalaError:
                left.append(note.name)
                continue
            path.unlink(missing_ok=True)
            if found:  # (a note by app whose commit never made a CVM goes without a word)
                swept.append(note.name)
        return swept, left

    def _note(self, api: str, app_id: str) -> Path:
        # Named by a digest: never a file name of the API's choosing.
        return self.folder / f"{hashlib.sha256(f'{api} {app_id}'.encode()).hexdigest()[:32]}.json"
