"""In a deployed flow's job or a ``@nomad`` task's job, before anything else (``FIRST``): its credentials,
read from the job's Nomad Variable with its workload identity through its agent's Task API, printed as
``export NAME=VALUE`` lines for its shell to ``eval``. A dispatched or periodic run of a deployed flow reads
its parent's: Nomad names their identities, and so the variables they may read, for the parent job.

It imports nothing but the standard library and ``engines.nomad.job_variable`` (which needs no more): a
task's image, or an ``exec`` or ``raw_exec`` client's Python, holds Metaflow's needs only.

    python -m metaflow_stack.nomad.job_secrets
"""

from __future__ import annotations

import os
import re
import shlex
import sys

from metaflow_stack.engines.nomad.job_variable import VariableGone, VariableRefused, read_own, variable_path
from metaflow_stack.errors import StackError

#: The shell line a job runs first to take its credentials (then ``eval``'d): or it ends at once, naming why
#: (after 2 s: Nomad's docker log collector stops with the container and would miss it).
FIRST = '{ secrets=$(python -m metaflow_stack.nomad.job_secrets) || { sleep 2; exit 1; }; } && eval "$secrets"'
#: What a shell takes as a variable's name (the job exports its credentials by these names).
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def exports(items: dict[str, str], fix: str) -> str:
    """``items`` as shell ``export`` lines, each value quoted whole; a name a shell would not take as a
    variable's is refused, not evaluated (the stack writes none: someone else wrote the variable)."""
    wrong = [name for name in items if not VARIABLE_NAME.fullmatch(name)]
    if wrong:
        raise StackError(f"it holds {wrong[0]!r}, which is not a variable's name", fix=fix)
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(items.items()))


def main() -> int:
    parent = os.environ.get("NOMAD_JOB_PARENT_ID")
    job = parent or os.environ.get("NOMAD_JOB_ID", "")
    # (a deployed flow's runs are its job's dispatched or periodic children; a task's job is its own)
    whose, again = ("the deployed flow's", "deploy the flow again: `nomad create`") if parent else ("the task's", "")
    again = again or "run the step again: its trampoline writes the variable before the job"
    try:
        sys.stdout.write(exports(read_own(job), again))
        return 0
    except VariableGone:
        said = f"it is gone (fix: {again})"
    except VariableRefused:
        said = "the job's identity may not read it (fix: check the ACL policies bound to the job)"
    except StackError as exc:
        said = str(exc)
    print(f"{whose} credentials in the Nomad Variable {variable_path(job)} could not be read: {said}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
