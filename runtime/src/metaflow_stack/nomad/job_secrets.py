"""In a deployed flow's job, before anything else: its credentials, read from the job's Nomad Variable with
its workload identity through its agent's Task API, printed as ``export NAME=VALUE`` lines for its shell to
``eval`` (``deployment.job_command``). A dispatched or periodic run reads its parent's: Nomad names their
identities, and so the variables they may read, for the parent job.

    python -m metaflow_stack.nomad.job_secrets
"""

from __future__ import annotations

import os
import re
import shlex
import sys

from metaflow_stack.engines.nomad.client import NomadClient, Settings
from metaflow_stack.errors import StackError
from metaflow_stack.nomad.deployment import variable_path

#: What a shell takes as a variable's name: anything else in the variable is refused, not evaluated.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def exports(items: dict[str, str]) -> str:
    """``items`` as shell ``export`` lines, each value quoted whole."""
    wrong = [name for name in items if not NAME.fullmatch(name)]
    if wrong:
        raise StackError(f"the job's variable holds {wrong[0]!r}, which is not a variable name", fix="deploy again")
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(items.items()))


def main() -> int:
    job = os.environ.get("NOMAD_JOB_PARENT_ID") or os.environ.get("NOMAD_JOB_ID", "")
    try:
        with NomadClient(Settings.from_env()) as client:
            sys.stdout.write(exports(client.variable(variable_path(job))))
    except StackError as exc:
        print(f"the job's credentials could not be read: {exc.message} (fix: {exc.fix})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
