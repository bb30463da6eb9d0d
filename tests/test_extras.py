"""Each part imports with only its own extra installed: the agent on the base
install, the UI on the ``ui`` extra, neither needing the metadata service's
database and broker libraries. The dev environment has everything, so the
missing libraries are blocked in a fresh interpreter (``sys.modules[name] =
None`` makes their import fail as if they were absent)."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: The service extra's own libraries, which only ``metaflow service serve`` may need.
SERVICE_ONLY = ("sqlalchemy", "alembic", "psycopg", "nats")
#: The servers' libraries, in the ui and service extras but not the base install.
SERVERS = ("fastapi", "starlette", "uvicorn", "watchfiles", "httpx_sse", "mcp")


def imports_without(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    block = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("blocked", "code"),
    [
        (
            SERVICE_ONLY + SERVERS,
            "from metaflow_stack.agent.queries import connect\n"
            "import metaflow_stack.agent.local_source, metaflow_stack.agent.service_source\n"
            "import metaflow_extensions.stack.cmd.agent_cli",
        ),
        (SERVICE_ONLY, "import metaflow_stack.ui.app, metaflow_stack.ui.service_runs"),
    ],
    ids=["agent-on-the-base-install", "ui-on-its-extra"],
)
def test_a_part_imports_with_only_its_own_extra(blocked: tuple[str, ...], code: str) -> None:
    done = imports_without(blocked, code)
    assert done.returncode == 0, done.stderr[-2000:]
