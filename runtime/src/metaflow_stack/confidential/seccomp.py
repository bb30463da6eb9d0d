"""The seccomp profile a ``gramine-direct`` task's container runs under, in place of Docker's default.

Gramine's Linux PAL (``gramine-direct``) starts by turning address-space
randomization off for itself, ``personality(ADDR_NO_RANDOMIZE)``, and
executing itself again: its fork emulation needs the loader at the same
address in every process. Docker's default profile allows ``personality``
only with a few other arguments, so under it every direct-mode task would
end at once. ``seccomp=unconfined`` would let it run, and would also hand the
step every system call Docker keeps from containers.

This profile keeps those out and lets ``personality`` through. It allows by
default and refuses (EPERM):
- each system call Docker's documentation lists as blocked by its default
  profile ("Significant syscalls blocked by the default profile"), except
  ``personality``;
- ``clone`` asking for a user namespace, the one namespace that dropped
  capabilities do not refuse already;
- ``clone3``, whose flags seccomp cannot read. It is answered ENOSYS, as
  Docker answers it, so the C library falls back to ``clone``.

Docker's own allow-list is stricter still. It is Docker's to keep, not ours
to copy. SGX mode needs no profile: its loader does not call ``personality``.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

#: Docker's documented list, ``personality`` left out (names an architecture lacks are skipped by runc).
REFUSED = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
    "finit_module", "get_kernel_syms", "get_mempolicy", "init_module", "ioperm", "iopl", "kcmp",
    "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mbind", "mount", "move_pages", "nfsservctl",
    "open_by_handle_at", "perf_event_open", "pivot_root", "process_vm_readv", "process_vm_writev", "ptrace",
    "query_module", "quotactl", "reboot", "request_key", "set_mempolicy", "setns", "settimeofday", "stime",
    "swapon", "swapoff", "sysfs", "_sysctl", "umount", "umount2", "unshare", "uselib", "userfaultfd", "ustat",
    "vm86", "vm86old",
)  # fmt: skip
#: ``<linux/sched.h>``: a new user namespace.
CLONE_NEWUSER = 0x10000000
#: The file's name, beside the step image's exchanges.
FILE = "gramine-direct.seccomp.json"


def profile() -> dict[str, Any]:
    """The profile, in Docker's JSON format; every architecture of the host's family, so that no
    compatibility system call table (32-bit x86, 32-bit Arm) gets around a refusal."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
        ],
        "syscalls": [
            {"names": list(REFUSED), "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM},
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": errno.EPERM,
                "args": [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER, "op": "SCMP_CMP_MASKED_EQ"}],
            },
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS},
        ],
    }


def written(folder: Path) -> Path:
    """The profile as a file in ``folder`` (Docker's client reads it from there), written whole."""
    path = folder / FILE
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{FILE}.", delete=False) as out:
        json.dump(profile(), out, indent=1)
    os.replace(out.name, path)
    return path
