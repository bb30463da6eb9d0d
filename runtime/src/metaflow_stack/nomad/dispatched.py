"""Inside a deployed flow's Nomad job: run the flow once, its parameters from the dispatch's ``Meta``.

    python -m metaflow_stack.nomad.dispatched FLOW_FILE [TOP-LEVEL OPTION...] -- [PARAMETER...]

Nomad hands a dispatch's ``Meta`` to the task as ``NOMAD_META_<key>`` (as written and upper-cased; a
character a variable's name cannot hold, but ``.``, as ``_``), and every optional key the dispatch did not
set as an empty string: a parameter that is empty or absent keeps its default (so a dispatch cannot give
a parameter the empty string). The run is tagged with the job's ID (``nomad-job:<id>``), and its id is
printed (``deployment.marker_line``) as soon as Metaflow has given it one, for ``trigger`` to read.
SIGTERM and SIGINT (``nomad job stop``) are passed to the run; the exit code is the run's (128 + N for a
signal).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metaflow_stack.nomad.deployment import marker_line


def meta_value(name: str, env: dict[str, str]) -> str | None:
    """The dispatch's value for the parameter ``name``, as Nomad put it in the task's environment."""
    for key in (name, re.sub(r"[^A-Za-z0-9_.]", "_", name)):
        for variable in (f"NOMAD_META_{key}", f"NOMAD_META_{key}".upper()):
            if env.get(variable):
                return env[variable]
    return None


def run_line(
    flow_file: str, top: list[str], parameters: list[str], env: dict[str, str], run_id_file: Path
) -> list[str]:
    """The ``run`` command of this dispatch."""
    line = [sys.executable, "-u", flow_file, *top, "run", "--run-id-file", str(run_id_file)]
    line += ["--tag", f"nomad-job:{env.get('NOMAD_JOB_ID', 'unknown')}"]
    for name in parameters:
        value = meta_value(name, env)
        if value is not None:
            line += [f"--{name}", value]
    return line


def main(argv: list[str]) -> int:
    flow_file, rest = argv[0], argv[1:]
    split = rest.index("--") if "--" in rest else len(rest)
    top, parameters = rest[:split], rest[split + 1 :]
    with tempfile.TemporaryDirectory() as folder:
        run_id_file = Path(folder) / "run-id"
        process = subprocess.Popen(run_line(flow_file, top, parameters, dict(os.environ), run_id_file))
        for stop in (signal.SIGTERM, signal.SIGINT):  # (as PID 1 of a container, this process ignores them)
            signal.signal(stop, lambda number, _: process.send_signal(number))
        while process.poll() is None and not _written(run_id_file):
            time.sleep(0.1)
        if run_id := _written(run_id_file):
            # One write (a pipe keeps it whole; print writes a line and its end apart, and the run's own output,
            # on the same stream, landed between them), a line of its own (``marker_line``).
            sys.stdout.flush()
            os.write(sys.stdout.fileno(), marker_line(run_id))
        code = process.wait()
        return 128 - code if code < 0 else code


def _written(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
