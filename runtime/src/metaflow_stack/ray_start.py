"""Starting Ray in this process, for the capabilities that run on it (Functions' ``ray`` backend, the
``@worker_pool`` Ray backend).

A Ray started here waits a fixed 30 seconds for its own node to register
(Ray's ``Node``: not configurable). On a machine busy enough to miss that,
a later start nearly always succeeds, so it is started again (the missed
start's processes stopped), up to ``METAFLOW_STACK_RAY_START_TRIES`` times
(3), before the failure is reported, in one line naming the fix. A cluster
that ``address`` (or ``RAY_ADDRESS``) names is probed first, since Ray itself
would retry for minutes before it gives up, and one that is not there is said
in one line too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import Any

from metaflow_stack import settings
from metaflow_stack.errors import StackError
from metaflow_stack.ids import is_number
from metaflow_stack.local_secrets import made_once

#: What Ray says when its node missed its startup window.
_NODE_TIMED_OUT = "timed out during startup"
#: Seconds a cluster's address is given to answer.
PROBE_TIMEOUT_S = 5.0
_NO_RAY_FIX = "start Ray there (ray start --head), or unset RAY_ADDRESS for a Ray on this machine"


def init(**options: Any) -> None:
    """``ray.init(**options)``, made again when Ray's own node missed its startup window; ``StackError`` when
    every try (``settings.ray_start_tries``) missed it. The processes a missed start left (its GCS and raylet:
    Ray's ``shutdown`` knows only a node that started) are stopped before the next try, so a busy machine is
    not given two Rays."""
    import psutil
    import ray

    address = options.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        _probe(address)
    elif not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        _private_token()
    tries = settings.at_least_one("STACK_RAY_START_TRIES", settings.load().ray_start_tries)
    for tries_left in reversed(range(tries)):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(**options)
            return
        except ConnectionError as exc:  # Ray's words for "auto" with no Ray to find
            raise StackError(f"no Ray at {address}: {str(exc).split('. ')[0]}", fix=_NO_RAY_FIX) from None
        except Exception as exc:  # Ray raises a bare Exception for it
            if _NODE_TIMED_OUT not in str(exc):
                raise
            ray.shutdown()
            _stop([c for c in psutil.Process().children(recursive=True) if c.pid not in before])
            if not tries_left:
                times = "once" if tries == 1 else f"in {tries} tries"
                raise StackError(
                    f"Ray's node did not start within Ray's 30 seconds {times}: this machine is too busy",
                    fix="try again when it is less busy, set METAFLOW_STACK_RAY_START_TRIES higher, or start Ray "
                    "(ray start --head) and set RAY_ADDRESS=auto",
                ) from None


def _private_token() -> None:
    """Ray's token for the user's local Rays (``~/.ray/auth_token``, which a new cluster asks every client
    for), readable by the user alone: made here, 0600, where there is none (Ray writes it with the user's
    umask, as a rule readable by every user), tightened to 0600 where it is readable by others. The token
    is all that keeps another user of the machine off a Ray listening on every interface."""
    token = Path.home() / ".ray" / "auth_token"
    made_once(token, lambda: secrets.token_hex(32).encode())
    if stat.S_IMODE(token.stat(follow_symlinks=False).st_mode) & 0o077 and not token.is_symlink():
        token.chmod(0o600)


def _probe(address: str) -> None:
    """Refuse an ``address`` (``host:port`` or ``ray://host:port``; ``auto`` is Ray's to find) where nothing
    answers."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and is_number(port):
        try:
            socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
        except OSError as exc:
            raise StackError(f"no Ray at {address}: {exc}", fix=_NO_RAY_FIX) from None


def _stop(processes: list[Any]) -> None:
    """Terminate ``processes`` (psutil's), then kill those still there after a few seconds."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
