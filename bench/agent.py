"""What an agent's questions about a run cost: Metaflow's Client API against ``metaflow_stack.agent``.

Runs a real foreach flow (``--width`` tasks, the last ``--fail`` of which
raise) recorded by the metadata service on SQLite, then answers the same
questions three ways: with the stock Client API and with the peer,
metaflow-mcp-server 0.5.0's tools (each in a process of its own that counts
every HTTP request Metaflow's service provider makes and every unpickle; the
peer in a throwaway environment, as it needs mcp 1.x), and with the agent
queries (which count their requests). Datastore
reads are not requests; the Client API's are listed as what it unpickles.

    python bench/agent.py [--width 1000] [--fail 3] [--routes] [--no-peer]

``--routes`` also prints, per question, the routes the Client API requested
and how often (docs/agent-audit.md is built from them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throwaway
from metadata_service import start_service

from metaflow_stack.agent import connect

console = Console(stderr=True)

FLOW = """
import os
from metaflow import FlowSpec, Parameter, step


class AgentBenchFlow(FlowSpec):
    width = Parameter("width", default=10, type=int)
    fail = Parameter("fail", default=0, type=int)

    @step
    def start(self):
        self.items = list(range(self.width))
        self.next(self.work, foreach="items")

    @step
    def work(self):
        if self.input >= self.width - self.fail:
            raise ValueError(f"item {self.input} is bad")
        self.value = {"item": self.input, "score": self.input / self.width}
        print(f"item {self.input} done")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    AgentBenchFlow()
"""

#: The stock Client API's answer to each question, run in a process that counts requests and unpickles.
STOCK = """
import json, pickle, re, sys, time
from collections import Counter
from urllib.parse import urlsplit
import requests
from metaflow import Flow, Run, namespace

namespace(None)
counts = {"requests": 0, "unpickles": 0}
paths = Counter()
send = requests.Session.request
def counted(self, method, url, *args, **kwargs):
    counts["requests"] += 1
    # The route, ids left out: what the audit lists.
    route = re.sub(r"/[0-9]+(?=/|$)", "/{id}", urlsplit(url).path).replace("/AgentBenchFlow", "/{flow}")
    paths[f"{method} {route}"] += 1
    return send(self, method, url, *args, **kwargs)
requests.Session.request = counted
loads = pickle.loads
def counted_loads(*args, **kwargs):
    counts["unpickles"] += 1
    return loads(*args, **kwargs)
pickle.loads = counted_loads

def recent_failed():
    return [r.pathspec for r in Flow("AgentBenchFlow").runs() if r.finished and not r.successful][:20]

def failures(run):
    found = []
    for step in Run(run):
        for task in step:
            if task.finished and not task.successful:
                found.append((task.pathspec, repr(task.exception)))
    return found

def artifacts(task):
    from metaflow import Task
    return [(a.id, a.size, type(a.data).__name__) for a in Task(task)]

def search(run):
    return [t.pathspec for step in Run(run) for t in step if "value" in t]

def stderr_tail(task):
    from metaflow import Task
    return Task(task).stderr.splitlines()[-50:]

# The peer: metaflow-mcp-server's tools, called as the functions they are (in its own environment).
def peer(tool, *args, **kwargs):
    import metaflow_mcp_server.server as server
    answer = getattr(server, tool)(*args, **kwargs)
    if '"error"' in answer[:200]:
        raise RuntimeError(answer[:2000])
    return answer

def peer_recent_failed():
    return peer("search_runs", "AgentBenchFlow", last_n=20, status="failed")

def peer_failures(run):
    return peer("get_run", run, summary=True)

def peer_artifacts(task):
    return peer("list_artifacts", task)

def peer_search(run):
    return peer("search_artifacts", "AgentBenchFlow", "value", last_n_runs=1)

def peer_stderr_tail(task):
    return peer("get_task_logs", task, stdout=False, tail=50)

question, argument = sys.argv[1], sys.argv[2]
if question.startswith("peer_"):
    import metaflow_mcp_server.server  # its import (mcp, pydantic) is not the question's cost
started = time.perf_counter()
answer = globals()[question](argument) if argument != "-" else globals()[question]()
print(json.dumps({"ms": (time.perf_counter() - started) * 1000, "paths": paths, **counts}))
"""


def run_flow(root: Path, url: str, width: int, fail: int) -> str:
    (root / "agent_bench_flow.py").write_text(FLOW)
    env = {**os.environ, "METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": url, "USER": "bench"}
    command = [sys.executable, "agent_bench_flow.py", "--datastore-root", str(root / ".metaflow"), "run"]
    command += ["--width", str(width), "--fail", str(fail), "--max-num-splits", str(width + 1)]
    command += ["--run-id-file", "run-id"]
    subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=7200)
    return f"AgentBenchFlow/{(root / 'run-id').read_text()}"


def peer_python(root: Path) -> str:
    """A throwaway environment for metaflow-mcp-server: it needs mcp 1.x, this project mcp 2.x."""
    import metaflow

    packages = ["metaflow-mcp-server==0.5.0", "mcp<2", f"metaflow=={metaflow.__version__.split('+')[0]}"]
    return str(throwaway.venv(root, "peer-venv", packages) / "python")


def client(python: str, url: str, root: Path, question: str, argument: str) -> dict:
    """One question answered in a process of its own (stock Client API or the peer), counted."""
    env = {
        **os.environ,
        "METAFLOW_DEFAULT_METADATA": "service",
        "METAFLOW_SERVICE_URL": url,
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root),
        # Metaflow's own provider: what users have without this project.
        "METAFLOW_EXTENSIONS_SEARCH_DIRS": str(root / "no-extensions"),
    }
    (root / "no-extensions").mkdir(exist_ok=True)
    result = subprocess.run(
        [python, "-c", STOCK, question, argument], env=env, capture_output=True, text=True, timeout=7200
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def ours(url: str, call) -> dict:
    with connect(url) as queries:
        queries.source.requests = 0
        started = time.perf_counter()
        call(queries)
        return {"ms": (time.perf_counter() - started) * 1000, "requests": queries.source.requests, "unpickles": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1000, help="tasks in the foreach")
    parser.add_argument("--fail", type=int, default=3, help="how many of its last tasks fail")
    parser.add_argument("--routes", action="store_true", help="list the Client API's requests by route")
    parser.add_argument("--no-peer", action="store_true", help="skip metaflow-mcp-server (needs its packages)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    process, url = start_service(str(root / "metadata.db"), root / "service.log", root / ".metaflow")
    try:
        with console.status(f"running a {args.width}-task foreach whose last {args.fail} tasks fail"):
            run = run_flow(root, url, args.width, args.fail)
        peer = None
        if not args.no_peer:
            with console.status("installing metaflow-mcp-server beside its mcp 1.x"):
                peer = peer_python(root)
        with connect(url) as queries:
            failed = queries.failures(run, limit=1).failures[0].pathspec
            some = queries.search_artifacts(run, name="value", limit=1).artifacts[0].pathspec
        questions = [
            ("the failed runs of a flow", "recent_failed", "-", lambda q: q.list_runs("AgentBenchFlow", "failed")),
            ("the failed tasks of a run, with errors", "failures", run, lambda q: q.failures(run)),
            ("a task's artifact names, sizes, types", "artifacts", some, lambda q: q.artifact_info(some)),
            ("tasks of a run holding an artifact", "search", run, lambda q: q.search_artifacts(run, name="value")),
            ("last 50 lines of a failed task's stderr", "stderr_tail", failed, lambda q: q.logs(failed, tail=50)),
        ]
        table = Table(title=f"agent questions on a {args.width}-task run (same machine, same run)")
        columns = ["question", "Client API requests", "ms", "unpickles"]
        columns += [] if peer is None else ["metaflow-mcp-server requests", "ms", "unpickles"]
        for column in [*columns, "agent requests", "ms"]:
            table.add_column(column)
        routes = Table(title="the Client API's requests by route")
        for column in ("question", "requests", "route"):
            routes.add_column(column)
        for label, name, argument, call in questions:
            with console.status(label):
                theirs = client(sys.executable, url, root, name, argument)
                peers = client(peer, url, root, f"peer_{name}", argument) if peer else None
                mine = ours(url, call)
            cells = [label, f"{theirs['requests']:,}", f"{theirs['ms']:,.0f}", f"{theirs['unpickles']:,}"]
            if peers is not None:
                cells += [f"{peers['requests']:,}", f"{peers['ms']:,.0f}", f"{peers['unpickles']:,}"]
            table.add_row(*cells, f"{mine['requests']:,}", f"{mine['ms']:,.1f}")
            for route, count in sorted(theirs["paths"].items(), key=lambda item: -item[1]):
                routes.add_row(label, f"{count:,}", route)
        Console(width=160).print(table)
        if args.routes:
            Console(width=160).print(routes)
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
