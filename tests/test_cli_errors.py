"""User mistakes at the command line, each found by trying them: one line naming the fix, never a traceback,
never minutes of silence, and nothing signalled that the user did not name."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import VENV_BIN, free_port, json_stdout, run_cli

from metaflow_stack.daemon import running_pid


def one_line(done: subprocess.CompletedProcess[str], says: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and says in done.stderr, done.stderr[-2000:]
    assert "fix: None" not in done.stderr and "fix:" in done.stderr


@pytest.mark.parametrize("held", ["0", "-1", "1", "not a pid", ""])
def test_a_pid_file_naming_no_single_process_is_no_process(tmp_path: Path, held: str) -> None:
    """``os.kill(0, ...)`` signals the caller's whole process group, ``-1`` every process it may: a damaged
    pid file must never reach it (``stack down``, the local service's stop)."""
    from metaflow_stack.daemon import _start

    pidfile = tmp_path / "service.pid"
    started = _start(psutil.Process())  # (this process's own start: only the pid is damaged)
    for pid in (held, json.dumps({"pid": held, "start": started, "run": ""})):
        pidfile.write_text(pid)
        assert running_pid(pidfile) is None
    pidfile.write_text(json.dumps({"pid": os.getpid(), "start": started, "run": ""}))
    assert running_pid(pidfile) == os.getpid()
    assert running_pid(tmp_path / "missing.pid") is None


def test_a_path_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    results = tmp_path / "ok.xml"
    results.write_text('<testsuite name="s" tests="1"><testcase name="t" classname="c"/></testsuite>')
    done = run_cli("stack", "ci", "report", str(results), "--junit-out", str(tmp_path / "a-file" / "x.xml"))
    one_line(done, "a-file")
    state = run_cli("stack", "registry", "down", env={"METAFLOW_STACK_STATE_DIR": str(tmp_path / "a-file")})
    one_line(state, str(tmp_path / "a-file"))


def test_a_call_timeout_an_in_process_server_cannot_keep_is_one_line(tmp_path: Path) -> None:
    reference = tmp_path / "reference.json"  # (refused before the reference is read)
    one_line(
        run_cli("function", "serve", str(reference), "--backend", "inprocess", "--call-timeout", "5"), "cannot stop"
    )


@pytest.mark.parametrize(
    "command",
    [
        ("service", "serve", "--event-retention-days", "inf"),  # (its relay failed every 5 s, for good)
        ("service", "serve", "--event-retention-days", "nan"),
        ("function", "serve", "reference.json", "--call-timeout", "nan"),
        ("function", "batch", "reference.json", "--input", "{tmp}/in.jsonl", "--output", "out", "--num-cpus", "inf"),
    ],
)
def test_a_number_that_is_not_finite_is_refused_naming_the_option(tmp_path: Path, command: tuple[str, ...]) -> None:
    (tmp_path / "in.jsonl").write_text("{}\n")
    done = run_cli(*(part.format(tmp=tmp_path) for part in command))
    assert done.returncode == 2 and f"Invalid value for '{command[-2]}'" in done.stderr, done.stderr[-2000:]
    assert "is not a finite number" in done.stderr or "is not in the valid range of 0.001 to 36500" in done.stderr
    assert "Traceback" not in done.stderr


def _decorated_flow(
    root: Path, decorator: str, *command: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``command`` run on a two-step flow in ``root`` whose ``start`` has ``@decorator``."""
    flow = root / "decorated_flow.py"
    flow.write_text(
        "from metaflow import FlowSpec, confidential, devcontainer, nomad, step\n"
        "class DecoratedFlow(FlowSpec):\n"
        f"    @{decorator}\n    @step\n    def start(self):\n        self.next(self.end)\n"
        "    @step\n    def end(self):\n        pass\n"
        "if __name__ == '__main__':\n    DecoratedFlow()\n"
    )
    line = [str(VENV_BIN / "python"), str(flow), "--no-pylint", *command]
    return subprocess.run(line, capture_output=True, text=True, cwd=root, timeout=300, env=env)


@pytest.mark.parametrize(
    ("setting", "option", "says"),
    [
        ('datacenters="dc1"', "--cpu=-1", "--cpu -1.0 and --memory 4096 must be above 0 (fix: --cpu 2 --memory"),
        ('datacenters="dc1"', "--cpu=nan", "--cpu nan and --memory 4096 must be above 0"),
        ('datacenters="dc1"', "--memory=0", "--cpu 1.0 and --memory 0 must be above 0"),
        ("datacenters=5", "--cpu=1", 'datacenters=5 names no datacenter (fix: datacenters=["dc1", "dc2"]'),
        ('cpu=float("inf")', "--cpu=1", "cpu=inf, memory=4096 and gpu=0 must be positive"),
        ('namespace="*"', "--cpu=1", "is not a Nomad namespace name (a wildcard is every namespace) (fix: use"),
        ("namespace='a\" { x'", "--cpu=1", "is not a Nomad namespace name (fix: use letters, digits and '-'"),
        ("gpu=2.7", "--cpu=1", "gpu=2.7 is not a whole number of GPUs (fix: @nomad(gpu=1))"),
        ("gpu_model=5", "--cpu=1", 'gpu_model=5 must be a name (fix: @nomad(gpu_model="...") or leave it out'),
        ("gpu=1, gpu_memory=-1", "--cpu=1", "gpu_memory=-1 must be 1 MB or more"),
    ],
)
def test_nomad_settings_that_cannot_be_are_one_line_naming_them(
    tmp_path: Path, setting: str, option: str, says: str
) -> None:
    """Each of these was answered with the fix of another (a decorator's for an option, numbers for a list)."""
    env = {**os.environ, "USER": "tester", "METAFLOW_DATASTORE_SYSROOT_S3": "s3://nowhere/flows"}
    done = _decorated_flow(tmp_path, f"nomad({setting})", "--datastore", "s3", "nomad", "create", option, env=env)
    assert done.returncode != 0 and says in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_nomad_trigger_waiting_past_a_week_is_one_line(tmp_path: Path) -> None:
    """Past that, the wait's clock overflowed: a traceback, after the job had been dispatched."""
    env = {**os.environ, "USER": "tester", "METAFLOW_DATASTORE_SYSROOT_S3": "s3://nowhere/flows"}
    line = ["--datastore", "s3", "nomad", "trigger", "--start-timeout", "10000000000"]
    done = _decorated_flow(tmp_path, 'nomad(datacenters="dc1")', *line, env=env)
    says = "--start-timeout 10000000000 must be 1 to 604800 seconds (fix: --start-timeout 600)"
    assert done.returncode != 0 and says in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_service_url_that_is_no_url_is_one_line_or_one_json_error() -> None:
    one_line(run_cli("agent", "flows", "--service-url", "http://localhost:8o80"), "is not a URL")
    answer = run_cli("agent", "flows", "--service-url", "http://localhost:8o80", "--json")
    assert answer.returncode == 1 and json_stdout(answer)["error"]["code"] == "bad_parameter"


@pytest.mark.parametrize("url", ["postgresql://x@h:abc/db", "postgresql://x:secret@[::1/db", "sqlite://"])
def test_a_database_url_sqlalchemy_cannot_use_is_one_line_without_its_password(url: str) -> None:
    done = run_cli("service", "migrate", "--database", url)
    one_line(done, "cannot use the database URL")
    assert "secret" not in done.stderr


@pytest.mark.parametrize(
    ("decorator", "says"),
    [
        ('devcontainer(pids="many")', "read_only must be true or false, cpu and pids numbers"),
        ("devcontainer(config=5)", "config=5 is not a path"),
        ('devcontainer(config="latin1.json")', "latin1.json: not UTF-8 text"),
        ("confidential(policy=5)", "policy: 5 is not a policy file's path"),
    ],
)
def test_a_flows_decorator_settings_of_the_wrong_kind_are_one_line(tmp_path: Path, decorator: str, says: str) -> None:
    (tmp_path / "latin1.json").write_bytes('{"image": "caf\xe9"}'.encode("latin-1"))
    done = _decorated_flow(tmp_path, decorator, "run")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert says in done.stderr and "fix: None" not in done.stderr, done.stderr[-2000:]


def test_a_devcontainer_json_asking_more_processes_than_the_decorator_allows_is_one_line(tmp_path: Path) -> None:
    """The decorator's ``pids`` is a ceiling the file may only lower: a file's higher ``--pids-limit`` was taken
    silently down to it, and the step then failed to fork, far from the cause."""
    (tmp_path / "dc.json").write_text('{"image": "python:3.12-slim", "runArgs": ["--pids-limit", "4096"]}')
    done = _decorated_flow(tmp_path, 'devcontainer(config="dc.json", pids=64)', "run")
    says = "runArgs: --pids-limit 4096 is above @devcontainer(pids=64) (fix: @devcontainer(pids=4096)"
    assert done.returncode != 0 and says in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_server_started_again_takes_its_port_while_the_last_ones_connections_wait_out_time_wait() -> None:
    """uvicorn binds with SO_REUSEADDR; binding the port here first (to say it and a busy one in one line)
    must too, or a restarted server fails for a minute (a pod's container, restarted)."""
    import socket

    from metaflow_extensions.stack.cmd.server_options import listening

    listener, url = listening("127.0.0.1", 0)
    port = listener.getsockname()[1]
    listener.listen()
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # (the server's side closes first: its end of the connection waits in TIME_WAIT)
    client.close()
    listener.close()
    again, url_again = listening("127.0.0.1", port)
    again.close()
    assert url == url_again == f"http://127.0.0.1:{port}/"


def _service_answers(url: str) -> None:
    """Wait (a minute at most) until the metadata service at ``url`` records a flow."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{url}flows/F", json={}, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    pytest.fail(f"the metadata service did not answer on {url}")


def test_a_metadata_service_whose_nats_is_away_says_so_once(tmp_path: Path) -> None:
    """nats-py logged a traceback at every reconnect, for as long as NATS stayed away."""
    port, nats_port = free_port(), free_port()
    server = subprocess.Popen(
        [
            *(str(VENV_BIN / "metaflow"), "service", "serve", "--port", str(port)),
            *("--database", str(tmp_path / "m.db"), "--nats-url", f"nats://127.0.0.1:{nats_port}"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _service_answers(f"http://127.0.0.1:{port}/")
        time.sleep(8)  # (several tries to reach NATS)
    finally:
        server.terminate()
        said = server.communicate(timeout=30)[0]
    assert "Traceback" not in said, said[-3000:]
    assert said.count("NATS: ") == 1 and "Connection refused" in said, said[-3000:]


def test_a_service_on_port_0_says_the_port_it_has_and_a_busy_port_is_one_line(tmp_path: Path) -> None:
    """``--port 0`` printed ``:0``; a port in use was uvicorn's log line, not a fix (as it is for the UI)."""
    import re

    server = subprocess.Popen(
        [str(VENV_BIN / "metaflow"), "service", "serve", "--port", "0", "--database", str(tmp_path / "m.db")],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        said = server.stderr.readline()
        url = re.search(r"metadata service on (http://127\.0\.0\.1:(\d+)/) ", said)
        assert url and url[2] != "0", said
        _service_answers(url[1])
        busy = run_cli("service", "serve", "--port", url[2], "--database", str(tmp_path / "m.db"))
        one_line(busy, f"cannot listen on 127.0.0.1:{url[2]}: Address already in use")
        one_line(run_cli("function", "serve", str(tmp_path / "none.json"), "--port", url[2]), "Address already in use")
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize(("content", "says"), [(b'{"cells": 5}', "not iterable"), (b"[1, 2]", "'list'"), (b"", "JSON")])
def test_a_file_that_is_no_notebook_is_one_line(tmp_path: Path, content: bytes, says: str) -> None:
    notebook = tmp_path / "nb.ipynb"
    notebook.write_bytes(content)
    one_line(run_cli("notebook", "export", str(notebook), "-o", str(tmp_path / "flow.py")), says)


def test_a_reference_file_that_is_not_text_is_one_line(tmp_path: Path) -> None:
    reference = tmp_path / "reference.bin"
    reference.write_bytes(bytes(range(256)) * 4)
    one_line(run_cli("function", "serve", str(reference)), "neither JSON nor an existing bundle path")


def test_a_flow_file_argo_check_cannot_load_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "half.py").write_text("x = (\n")
    one_line(run_cli("stack", "ci", "argo-check", str(tmp_path / "half.py")), "cannot be loaded as a flow: SyntaxError")


def test_a_notebook_jupyter_opens_still_exports_though_its_schema_is_not_exact(tmp_path: Path) -> None:
    """nbformat reads past what its schema refuses (a key a cell should not have), and so does Jupyter: the
    export refuses only what it cannot read, not such a notebook."""
    cell = {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "made_up": 1}
    sources = ["%%flow NbFlow", "%%step start --next end\nself.x = 1", "%%step end\nprint(self.x)"]
    notebook = {"cells": [{**cell, "source": text} for text in sources], "metadata": {}, "nbformat": 4}
    (tmp_path / "nb.ipynb").write_text(json.dumps(notebook | {"nbformat_minor": 4}))
    done = run_cli("notebook", "export", str(tmp_path / "nb.ipynb"), "-o", str(tmp_path / "flow.py"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "class NbFlow(FlowSpec)" in (tmp_path / "flow.py").read_text()


def test_a_nats_outage_is_said_once_and_a_later_one_again(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from metaflow_stack.service import event_bus

    async def outages() -> None:
        for _ in range(3):
            await event_bus._said_once(ConnectionRefusedError(111, "Connection refused"))
        await event_bus._connected_again()
        await event_bus._said_once(ConnectionRefusedError(111, "Connection refused"))

    with caplog.at_level("WARNING", logger="metaflow_stack.service.events"):
        asyncio.run(outages())
    said = [record.getMessage() for record in caplog.records]
    assert [line.split(" (")[0] for line in said] == [
        "NATS: ConnectionRefusedError: [Errno 111] Connection refused",
        "NATS: connected again",
        "NATS: ConnectionRefusedError: [Errno 111] Connection refused",
    ], said
