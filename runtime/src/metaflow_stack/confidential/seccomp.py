"""The seccomp profile a ``gramine-direct`` task's container runs under, in place of Docker's default.

Gramine's Linux PAL (``gramine-direct``) starts by turning address-space
randomization off for itself, ``personality(ADDR_NO_RANDOMIZE)``, and
executing itself again: its fork emulation needs the loader at the same
address in every process. Docker's default profile allows ``personality``
only with a few other arguments, so under it every direct-mode task would
end at once. Gramine's documentation answers with a copy of Docker's profile
that widens ``personality``; ``seccomp=unconfined`` would also let it run,
and hand the step every system call Docker keeps from containers.

This profile is the stack's own. It allows by default and refuses (EPERM):
- each system call Docker's documentation lists as blocked by its default
  profile, except ``personality``;
- what Docker's profile has refused since that list was written
  (``io_uring``, whose calls served container escapes) and the newer twins
  of listed calls (the new mount API, ``pidfd_getfd``, ``migrate_pages``,
  ...);
- sockets of the families Docker's profile refuses (``AF_ALG``,
  ``AF_VSOCK``), and the 32-bit ``socketcall`` that would get around it;
- ``clone`` asking for a user namespace, the one namespace that dropped
  capabilities do not refuse already;
- ``clone3``, whose flags seccomp cannot read. It is answered ENOSYS, as
  Docker answers it, so the C library falls back to ``clone``.

What it cannot do, being a deny-list: refuse what a kernel adds later, or
narrow ``personality`` to some arguments (a refusal outranks any allowance
in seccomp). Docker's allow-list is stricter. It is Docker's to keep, not
ours to copy. The task's processes also run without capabilities and
without privilege escalation, as every stack container does. SGX mode needs
no profile: its loader does not call ``personality``.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

from metaflow_stack.deploy import write_atomically

#: Docker's documented list, ``personality`` left out (names an architecture lacks are skipped by runc), and more.
REFUSED = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
    "finit_module", "get_kernel_syms", "get_mempolicy", "init_module", "ioperm", "iopl", "kcmp",
    "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mbind", "mount", "move_pages", "nfsservctl",
    "open_by_handle_at", "perf_event_open", "pivot_root", "process_vm_readv", "process_vm_writev", "ptrace",
    "query_module", "quotactl", "reboot", "request_key", "set_mempolicy", "setns", "settimeofday", "stime",
    "swapon", "swapoff", "sysfs", "_sysctl", "umount", "umount2", "unshare", "uselib", "userfaultfd", "ustat",
    "vm86", "vm86old",
    # refused by Docker's profile since its list was written, and newer twins of listed calls
    "io_uring_setup", "io_uring_enter", "io_uring_register", "migrate_pages", "set_mempolicy_home_node",
    "pidfd_getfd", "process_madvise", "clock_settime64", "clock_adjtime64", "quotactl_fd", "name_to_handle_at",
    "open_tree", "open_tree_attr", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "mount_setattr",
    "fanotify_init", "syslog", "vhangup", "socketcall",
)  # fmt: skip
#: ``<sys/socket.h>``: the families Docker's profile refuses (the kernel's crypto API, VM sockets).
AF_ALG, AF_VSOCK = 38, 40
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
            *(
                {
                    "names": ["socket"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": errno.EPERM,
                    "args": [{"index": 0, "value": family, "op": "SCMP_CMP_EQ"}],
                }
                for family in (AF_ALG, AF_VSOCK)
            ),
        ],
    }


def write(folder: Path) -> Path:
    """The profile as a file in ``folder``, where Docker's client reads it when a container is created: written
    whole, and only when it is not there as it is now."""
    path, text = folder / FILE, json.dumps(profile(), indent=1)
    if path.is_file() and path.read_text() == text:
        return path
    return write_atomically(path, text)
