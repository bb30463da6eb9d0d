"""The seccomp profile of a ``gramine-direct`` task's container, on the real engine: the call Gramine starts
with, which Docker's default profile refuses, goes through; what Docker's documentation lists as kept from
containers stays refused."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from conftest import TEST_LABELS

from metaflow_stack.confidential import seccomp
from metaflow_stack.engines import JobSpec
from metaflow_stack.engines.docker import DockerEngine

pytestmark = pytest.mark.docker

#: Each call's result in the container: its return value, or minus its errno.
PROBE = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
number = {
    "x86_64": {"keyctl": 250, "clone3": 435, "clone": 56, "io_uring_setup": 425},
    "aarch64": {"keyctl": 219, "clone3": 435, "clone": 220, "io_uring_setup": 425},
}[os.uname().machine]
def clone_user_namespace():
    child = call("syscall", number["clone"], 0x10000000 | 17, 0, 0, 0, 0)  # CLONE_NEWUSER | SIGCHLD
    if child == 0:
        os._exit(0)
    if child > 0:
        os.waitpid(child, 0)
    return child
def call(name, *args):
    result = getattr(libc, name)(*args)
    return -ctypes.get_errno() if result < 0 else result
pid = os.fork()
if pid == 0:
    os._exit(7)
print(json.dumps({
    "personality": call("personality", 0x0040000),
    "unshare": call("unshare", 0x10000000),
    "keyctl": call("syscall", number["keyctl"], 0, 0),
    "clone3": call("syscall", number["clone3"], 0, 0),
    "fork": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]),
    "clone_user_namespace": clone_user_namespace(),
    "io_uring_setup": call("syscall", number["io_uring_setup"], 1, 0),
    "af_vsock": call("socket", 40, 1, 0),
    "af_alg": call("socket", 38, 5, 0),
    "af_inet": call("socket", 2, 1, 0),
}))
"""


def _probe(image: str, profile: str | None) -> dict[str, int]:
    spec = JobSpec(image=image, command=["python", "-c", PROBE], labels=TEST_LABELS, seccomp=profile)
    job = DockerEngine().launch(spec)
    try:
        assert job.wait(timeout=120) == 0, "\n".join(job.logs())
        return json.loads(list(job.logs())[-1])
    finally:
        job.remove()


def test_gramine_direct_runs_under_its_profile_and_docker_keeps_the_rest_out(base_image: str, tmp_path: Path) -> None:
    under_default = _probe(base_image, None)
    assert under_default["personality"] == -errno.EPERM  # why the profile exists

    profile = seccomp.write(tmp_path)
    calls = _probe(base_image, str(profile))
    assert calls["personality"] >= 0  # Gramine's first call
    assert calls["fork"] == 7  # processes as usual
    assert calls["unshare"] == -errno.EPERM  # a user namespace: refused, as Docker refuses it
    assert calls["keyctl"] == -errno.EPERM  # the kernel keyring: on Docker's list
    assert calls["clone3"] == -errno.ENOSYS  # unreadable flags: the C library falls back to clone
    assert calls["clone_user_namespace"] == -errno.EPERM  # the same through clone
    assert calls["io_uring_setup"] == -errno.EPERM  # refused by Docker since its documented list
    assert calls["af_vsock"] == calls["af_alg"] == -errno.EPERM  # the families Docker's profile refuses
    assert calls["af_inet"] >= 0  # and not the others

    written = profile.stat().st_mtime_ns
    assert seccomp.write(tmp_path) == profile and profile.stat().st_mtime_ns == written  # once, not per task
    assert [path.name for path in tmp_path.iterdir()] == [seccomp.FILE]  # whole: no temporary left
