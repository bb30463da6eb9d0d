"""A pooled foreach whose items say where they ran: the interpreter, where Metaflow came from, and the
version of a package only the step's environment holds.

With ``ENVIRONMENT_POOL_FLOW_PYPI`` set (and ``--environment pypi``) the items' step asks for that
package with ``@pypi``; without it the step is plain, for a test that hands its tasks to a pool by hand.
``ENVIRONMENT_POOL_FLOW_BACKEND`` names the pool's backend (default: local).
"""

import importlib.metadata
import os
import sys
from pathlib import Path

import metaflow
from metaflow import FlowSpec, pypi, step, worker_pool

PACKAGE = "tabulate"
own = pypi(packages={PACKAGE: "0.9.0"}) if os.environ.get("ENVIRONMENT_POOL_FLOW_PYPI") else (lambda f: f)


def launcher() -> str:
    """The command line of the process that started this item's fork server (Linux's ``/proc``): the run's
    runtime for a local pool, a Ray actor for a Ray one."""
    server = Path(f"/proc/{os.getppid()}/stat").read_text()
    return Path(f"/proc/{server.rpartition(')')[2].split()[1]}/cmdline").read_bytes().replace(b"\0", b" ").decode()


class EnvironmentPoolFlow(FlowSpec):
    @step
    def start(self):
        self.items = [0, 1, 2]
        self.next(self.each, foreach="items")

    @worker_pool(size=2, backend=os.environ.get("ENVIRONMENT_POOL_FLOW_BACKEND", "local"))
    @own
    @step
    def each(self):
        self.python = sys.executable
        self.metaflow_from = metaflow.__file__
        self.launcher = launcher()
        try:
            self.package = importlib.metadata.version(PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            self.package = None
        self.next(self.join)

    @step
    def join(self, inputs):
        self.pythons = sorted({i.python for i in inputs})
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    EnvironmentPoolFlow()
