"""In a deployed flow's job, before anything else: its credentials, read from the job's Nomad Variable with
its workload identity through its agent's Task API, printed as ``export NAME=VALUE`` lines for its shell to
``eval`` (``deployment.job_command``). A dispatched or periodic run reads its parent's: Nomad names their
identities, and so the variables they may read, for the parent job.

    python -m metaflow_stack.nomad.job_secrets
"""

from __future__ import annotations

import os
import shlex
import sys

from metaflow_stack.engines.nomad.client import NotFound, Refused, Unavailable
from metaflow_stack.engines.nomad.job_variable import NO_TASK_API, read_own, variable_path
from metaflow_stack.errors import StackError
from metaflow_stack.nomad.deployment import VARIABLE_NAME

#: The shell line a job runs first to take its credentials (then ``eval``'d): or it ends at once, naming why
#: (after 2 s: Nomad's docker log collector stops with the container and would miss it).
FIRST = '{ secrets=$(python -m metaflow_stack.nomad.job_secrets) || { sleep 2; exit 1; }; } && eval "$secrets"'


def exports(items: dict[str, str]) -> str:
    """``items`` as shell ``export`` lines, each value quoted whole; a name a shell would not take as a
    variable's is refused, not evaluated (``create`` writes none: someone else wrote the variable)."""
    wrong = [name for name in items if not VARIABLE_NAME.fullmatch(name)]
    if wrong:
        raise StackError(f"it holds {wrong[0]!r}, which is not a variable's name", fix="deploy again (`nomad create`)")
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(items.items()))


def main() -> int:
    job = os.environ.get("NOMAD_JOB_PARENT_ID") or os.environ.get("NOMAD_JOB_ID", "")
    path = variable_path(job)
    try:
        sys.stdout.write(exports(read_own(job)))
    except NotFound:
        said = "it is gone (fix: deploy the flow again: `nomad create` writes it)"
    except Refused:
        said = "the job's identity may not read it (fix: deploy the flow again with `nomad create`, which gives it one)"
    except Unavailable:
        said = NO_TASK_API
    except StackError as exc:
        said = str(exc)
    else:
        return 0
    print(f"the deployed flow's credentials in the Nomad Variable {path} could not be read: {said}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
