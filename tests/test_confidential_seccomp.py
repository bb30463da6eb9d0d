"""The seccomp profile of a ``gramine-direct`` task's container, on the real engine: the call Gramine starts
with, which Docker's default profile refuses, goes through; what Docker's documentation lists as kept from
containers stays refused."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from conftest import TEST_LABEL

from metaflow_stack.confidential import seccomp
from metaflow_stack.engines import JobSpec
from metaflow_stack.engines.docker import DockerEngine

pytestmark = pytest.mark.docker

#: Each call's result in the container: its return value, or minus its errno.
PROBE = """
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
number = {"x86_64": {"keyctl": 250, "clone3": 435}, "aarch64": {"keyctl": 219, "clone3": 435}}[os.uname().machine]
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
}))
"""


def _probe(image: str, profile: str | None) -> dict[str, int]:
    spec = JobSpec(image=image, command=["python", "-c", PROBE], labels={TEST_LABEL: "true"}, seccomp=profile)
    job = DockerEngine().launch(spec)
    try:
        assert job.wait(timeout=120) == 0, "\n".join(job.logs())
        return json.loads(list(job.logs())[-1])
    finally:
        job.remove()


def test_gramine_direct_runs_under_its_profile_and_docker_keeps_the_rest_out(base_image: str, tmp_path: Path) -> None:
    under_default = _probe(base_image, None)
    assert under_default["personality"] == -errno.EPERM  # why the profile exists

    calls = _probe(base_image, str(seccomp.written(tmp_path)))
    assert calls["personality"] >= 0  # Gramine's first call
    assert calls["fork"] == 7  # processes as usual
    assert calls["unshare"] == -errno.EPERM  # a user namespace: refused, as Docker refuses it
    assert calls["keyctl"] == -errno.EPERM  # the kernel keyring: on Docker's list
    assert calls["clone3"] == -errno.ENOSYS  # unreadable flags: the C library falls back to clone
    assert not list(tmp_path.glob(".*"))  # written whole, no temporary left
