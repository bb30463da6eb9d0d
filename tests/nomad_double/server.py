"""A double of a Nomad agent's HTTP API, for the tests on machines where Nomad cannot be installed.

It implements only the endpoints ``@nomad`` uses, with Nomad's documented
JSON (https://developer.hashicorp.com/nomad/api-docs: jobs, evaluations,
allocations, client/fs logs, ACLs, namespaces, status) and one node: this machine, datacenter
``dc1``, node pool ``default``, attributes ``${attr.kernel.name}=linux``
and ``${node.datacenter}=dc1``, this machine's cores, 16 GiB and no
devices. Each docker task runs as a container on the local Docker engine
(labelled ``io.metaflow-stack.nomad-double``, and with each ``--label
KEY=VALUE``: the tests mark their session's); each raw_exec task as a
process of the double's, in a task folder of its allocation's, with the
double's environment less Nomad's default ``env.denylist``, its output in
``alloc/logs/<task>.<kind>.<n>``, rotated at the task's ``LogConfig`` size
(as dev mode enables raw_exec). The node has
no exec driver (Nomad offers it only to an agent running as root): a job
for it is filtered out (``missing drivers``), as Nomad's scheduler does. Its fidelity is
checked by the same suite passing against a real ``nomad agent -dev`` in
the GitHub workflow's ``clusters`` job.

- ``PUT /v1/jobs``: the body checked against ``job.schema.json`` (Nomad's
  fields; 400 otherwise); an evaluation that places the task group's
  ``Count`` allocations on the node (named ``<job>.<group>[<index>]``), or
  records why not (``FailedTGAllocs``: ``ConstraintFiltered``,
  ``DimensionExhausted``), as Nomad's scheduler does: a device the node
  lacks filters it (``missing devices``), more cores than it has or more
  memory than its live allocations leave exhausts it (a blocked evaluation
  that the double, unlike Nomad, never places later). A
  task's command and arguments have ``${NAME}`` replaced by its variables
  (its own and the runtime's: ``NOMAD_JOB_ID``, ``NOMAD_ALLOC_INDEX``...),
  as Nomad interpolates them; no other of Nomad's interpolations.
- Blocking queries (``index``, ``wait``) on ``/v1/evaluation/:id``,
  ``/v1/job/:id/allocations`` and ``/v1/allocation/:id``, with
  ``X-Nomad-Index``.
- ``GET /v1/client/fs/logs/:alloc``: 404 "task not started yet" before the
  task starts, then its stdout or stderr as ``StreamFrame`` objects
  (``Data`` base64, ``Offset``, ``File``), a heartbeat ``{}`` each second
  nothing is written; it follows while asked.
- ``DELETE /v1/job/:id?purge=true``: answered at once, the job gone, its
  allocations told to stop (``DesiredStatus: stop``) and still listed by
  the job's ID; then, as Nomad's client does, each task stopped (a
  container killed; a raw_exec process sent the task's ``KillSignal``,
  SIGINT by default, then SIGKILL after its ``KillTimeout``) and its
  allocation ``complete``.
- ACLs, as an agent with them enabled answers: ``--token`` is a management
  token from the start; with ``--acl-bootstrap`` there is none until
  ``POST /v1/acl/bootstrap`` makes one (once). A request without a known
  ``X-Nomad-Token`` gets 403 ``Permission denied``. Client tokens hold
  policies (``POST /v1/acl/policy/:name``, rules written as ``namespace
  "NAME" { capabilities = [...] }``, the one form modelled) and may call an
  endpoint only with the capability its "ACL Required" column names, in
  the request's namespace (``?namespace=``, the job's own for a
  registration, unless the query names one); ACL and namespace writes need
  the management token; ``GET /v1/nodes`` (this node, ready, with its
  drivers; with ``?resources=true`` its ``NodeResources`` and
  ``ReservedResources``) a policy with ``node { policy = "read" }`` (the one
  block other than ``namespace`` modelled) or the management token.
  ``GET /v1/acl/token/self`` answers 404 for a token it does not know;
  without ACLs, the ACL endpoints answer 400 "ACL support disabled".
  ``POST /v1/namespace/:name`` makes a namespace; a job in one that does
  not exist is refused (500, as Nomad's validator answers).
  ``GET /v1/status/leader`` needs no token.
- Workload identities: every task's is a JWT the double signs (HS256
  here; Nomad's leader signs with its keyring), claiming the task's
  namespace, allocation, task and job (a dispatched or periodic job's
  parent, as Nomad's ``GetIDforWorkloadIdentity`` does). A task with an
  ``Identity`` block gets it in ``NOMAD_TOKEN`` (``Env``; the double models
  no ``File``), and its agent's Task API on ``secrets/api.sock`` (Nomad
  opens it for every task; the double only for these, the ones that can
  authenticate there). The Task API always requires a token (401 without
  one); with ACLs, a token or identity it takes (403 otherwise), an
  identity refused once its allocation is terminal. With ACLs, an identity holds the
  policies bound to its job (``JobACL`` on ``POST /v1/acl/policy/:name``,
  ``nomad acl policy apply -job``).
- Variables: ``PUT``, ``GET`` and ``DELETE /v1/var/:path`` (``Items``,
  strings, at least one), in the body's namespace, else the query's. With
  ACLs, a token needs a ``variables { path "GLOB" { capabilities = [...] }
  }`` rule matching the path (``write``, ``read``, ``destroy``; the
  double unions matching rules, and models no ``deny``); a workload
  identity may also read its own job's (``nomad/jobs/<job>``, and its
  group's and task's below it), as Nomad's implicit workload policy.
  ``GET`` and ``DELETE /v1/acl/policy/:name`` (management; the double's
  answer holds only the name and ``JobACL``).
- A task's folders (``alloc``, ``local``, ``secrets``): a raw_exec task
  works in them; a docker task has them mounted at ``/alloc``, ``/local``
  and ``/secrets``, as Nomad's docker driver mounts them, with
  ``NOMAD_ALLOC_DIR``, ``NOMAD_TASK_DIR`` and ``NOMAD_SECRETS_DIR`` set to
  where the task sees them.

    python tests/nomad_double/server.py --port PORT [--token TOKEN | --acl-bootstrap]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hcl2
import jsonschema
import jwt
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from python_on_whales import DockerClient
from python_on_whales.exceptions import DockerException

SCHEMA = json.loads((Path(__file__).resolve().parent / "job.schema.json").read_text())
LABEL = "io.metaflow-stack.nomad-double"
NODE = {
    "${attr.kernel.name}": "linux",
    "${node.datacenter}": "dc1",
    "${node.pool}": "default",
    "${node.unique.name}": os.uname().nodename,
}
NODE_ID = str(uuid.uuid4())
NODE_MEMORY_MB = 16384
#: The node's CPU in MHz per core (Nomad's ``CpuShares``: the cores times their clock).
NODE_MHZ_PER_CORE = 2000
#: An allocation that holds its resources on the node (``ClientStatus``).
LIVE = ("pending", "running")
#: The node's drivers: docker, and raw_exec as dev mode enables it; no exec, which Nomad offers only to an
#: agent running as root.
NODE_DRIVERS = ("docker", "raw_exec")
#: The client's variables Nomad never passes to exec and raw_exec tasks (its default ``env.denylist``).
ENV_DENYLIST = frozenset(
    {
        "CONSUL_TOKEN",
        "CONSUL_HTTP_TOKEN",
        "VAULT_TOKEN",
        "NOMAD_LICENSE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "GOOGLE_APPLICATION_CREDENTIALS",
    }
)
HEARTBEAT_S = 1.0
#: The ``FileEvent`` of a log file deleted under its reader (``deleteEvent``, ``client/fs_endpoint.go``).
DELETED = "file deleted"
ZERO_TIME = "0001-01-01T00:00:00Z"
#: The namespace capabilities that allow each endpoint (the "ACL Required" column of Nomad's API docs), by
#: method and path pattern.
NEEDS = (
    ("PUT", r"/v1/jobs", "submit-job"),
    ("POST", r"/v1/jobs", "submit-job"),
    ("GET", r"/v1/jobs", "list-jobs"),
    ("POST", r"/v1/validate/job", "read-job"),
    ("GET", r"/v1/evaluation/.+", "read-job"),
    ("GET", r"/v1/job/.+", "read-job"),
    ("DELETE", r"/v1/job/.+", "submit-job"),
    ("POST", r"/v1/job/.+/(dispatch|periodic/force)", "dispatch-job"),
    ("GET", r"/v1/allocation/.+", "read-job"),
    ("GET", r"/v1/client/fs/logs/.+", "read-logs"),
    ("GET", r"/v1/client/fs/logs/.+", "read-fs"),
)
#: Paths anyone may call, token or not (token/self answers 404 for a token it does not know).
OPEN = ("/v1/status/leader", "/v1/acl/bootstrap", "/v1/acl/token/self")
#: The audience of a task's default workload identity.
IDENTITY_AUDIENCE = "nomadproject.io"
#: Where a docker task sees its allocation's folders (Nomad's docker driver mounts them there).
CONTAINER_FOLDERS = {"NOMAD_ALLOC_DIR": "/alloc", "NOMAD_TASK_DIR": "/local", "NOMAD_SECRETS_DIR": "/secrets"}


class Acl:
    """Tokens, policies and namespaces, as an agent with ACLs enabled keeps them."""

    def __init__(self, management: str | None) -> None:
        self.tokens: dict[str, dict[str, Any]] = {}
        self.policies: dict[str, dict[str, set[str]]] = {}
        #: The policies bound to a job's workloads (``JobACL``): name -> (namespace, job ID).
        self.bound: dict[str, tuple[str, str]] = {}
        #: Each policy's ``variables`` rules: name -> namespace -> (path glob, capabilities).
        self.variable_paths: dict[str, dict[str, list[tuple[str, set[str]]]]] = {}
        #: The policies whose ``node`` block lets their tokens read the nodes (``policy = "read"`` or more).
        self.node_readers: set[str] = set()
        self.bootstrapped = management is not None
        if management:
            self.add_token("bootstrap", "management", [], secret=management)

    def add_token(self, name: str, kind: str, policies: list[str], secret: str | None = None) -> dict[str, Any]:
        token = {
            "AccessorID": str(uuid.uuid4()),
            "SecretID": secret or str(uuid.uuid4()),
            "Name": name,
            "Type": kind,
            "Policies": policies or None,
            "Global": kind == "management",
        }
        self.tokens[token["SecretID"]] = token
        return token

    def add_policy(self, name: str, rules: str, job_acl: dict[str, Any] | None = None) -> str | None:
        """Keep the policy (bound to ``job_acl``'s job's workloads, where given); what is wrong with its rules,
        if anything."""
        try:
            parsed = hcl2.loads(rules)
        except Exception as exc:  # lark's errors, each naming the line
            return f"Failed to parse ACL Policy: {exc}"
        blocks = parsed.get("namespace", [])
        node = {block.get("policy", "").strip('"') for block in parsed.get("node", [])}
        granted: dict[str, set[str]] = {}
        paths: dict[str, list[tuple[str, set[str]]]] = {}
        for block in blocks:
            for label, body in _labelled(block):
                namespace, capabilities = label.strip('"'), body.get("capabilities", [])
                entries = [e for v in body.get("variables", []) for p in v.get("path", []) for e in _labelled(p)]
                if not isinstance(capabilities, list) or not (capabilities or entries):
                    return "the double models only namespace blocks with capabilities or variables paths"
                granted[namespace] = {c.strip('"') for c in capabilities}
                paths[namespace] = [(glob.strip('"'), {c.strip('"') for c in r["capabilities"]}) for glob, r in entries]
        self.policies[name] = granted
        self.variable_paths[name] = paths
        if node & {"read", "write"}:
            self.node_readers.add(name)
        else:
            self.node_readers.discard(name)
        if job_acl:
            self.bound[name] = (job_acl.get("Namespace") or "default", job_acl.get("JobID") or "")
        else:
            self.bound.pop(name, None)
        return None

    def refusal(
        self, method: str, path: str, namespace: str, secret: str | None, workload: dict[str, Any] | None
    ) -> str | None:
        """Why the request may not be made, or ``None`` (``workload``: the claims of the workload identity
        ``secret`` is, if it is one)."""
        if path in OPEN:
            return None
        token = self.tokens.get(secret or "")
        if workload is not None:
            job = (workload["nomad_namespace"], workload["nomad_job_id"])
            policies = [name for name, bound in self.bound.items() if bound == job]
        elif token is None:
            return "Permission denied"
        elif token["Type"] == "management":
            return None
        else:
            policies = token["Policies"] or []
        if (method, path) == ("GET", "/v1/nodes"):  # (node:read, outside any namespace)
            return None if self.node_readers.intersection(policies) else "Permission denied"
        if path.startswith("/v1/var/"):  # (a variable's own rules, by its path)
            return self.variable_refusal(method, path.removeprefix("/v1/var/"), namespace, policies, workload)
        held = set().union(*(self.policies.get(p, {}).get(namespace, set()) for p in policies))
        allowed = any(m == method and re.fullmatch(pattern, path) and c in held for m, pattern, c in NEEDS)
        return None if allowed else "Permission denied"

    def variable_refusal(
        self, method: str, path: str, namespace: str, policies: list[str], workload: dict[str, Any] | None
    ) -> str | None:
        """A variable's ``read``, ``write`` or ``destroy`` (by method) as the policies' ``variables`` paths
        grant it (globs), and a workload's implicit policy: its own job's variables readable in its namespace
        (``nomad/jobs``, ``nomad/jobs/<job>``, and its group's and task's below it: these paths exactly)."""
        wanted = {"GET": "read", "PUT": "write", "DELETE": "destroy"}.get(method, "")
        rules = [rule for p in policies for rule in self.variable_paths.get(p, {}).get(namespace, [])]
        if workload is not None and namespace == workload["nomad_namespace"] and wanted == "read":
            job, group, task = workload["sub"].split(":")[2:5]  # (region:namespace:job:group:task:identity)
            own = ("nomad/jobs", f"nomad/jobs/{job}", f"nomad/jobs/{job}/{group}", f"nomad/jobs/{job}/{group}/{task}")
            if path in own:
                return None
        allowed = any(fnmatch.fnmatchcase(path, glob) and wanted in caps for glob, caps in rules)
        return None if allowed else "Permission denied"


class Cluster:
    """The double's state: jobs, evaluations, allocations, one index that every change moves."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.index = 1
        self.jobs: dict[str, dict[str, Any]] = {}
        self.evals: dict[str, dict[str, Any]] = {}
        self.allocs: dict[str, dict[str, Any]] = {}
        self.namespaces = {"default"}
        #: Nomad Variables by namespace and path.
        self.variables: dict[tuple[str, str], dict[str, Any]] = {}
        #: The threads stopping deregistered allocations' tasks.
        self.stopping: list[threading.Thread] = []
        #: What runs each started allocation's task: a container ID, or a raw_exec process.
        self.started: dict[str, str | RawExec] = {}
        #: Each started allocation's folder, and the Task API of each whose task has an identity.
        self.roots: dict[str, Path] = {}
        self.task_apis: dict[str, TaskApi] = {}
        #: The ASGI app a Task API serves (the double's own, set by ``app``).
        self.api: Any = None
        self.signing_key = secrets.token_bytes(32)
        #: Labels on every docker task's container besides the double's own (``--label``).
        self.labels: dict[str, str] = {}
        self.docker = DockerClient()

    def bump(self, obj: dict[str, Any]) -> None:
        with self.changed:
            self.index += 1
            obj["ModifyIndex"] = self.index
            obj.setdefault("CreateIndex", self.index)
            self.changed.notify_all()

    def wait(self, get: Any, index: int, wait_s: float) -> tuple[Any, int]:
        """Nomad's blocking query: ``get()`` once its result's index passes ``index``, or after ``wait_s``."""
        deadline = time.monotonic() + wait_s
        with self.changed:
            while True:
                found, at = get()
                if at > index or not index or time.monotonic() >= deadline:
                    return found, max(at, 1)
                self.changed.wait(max(deadline - time.monotonic(), 0))

    # -- the scheduler ------------------------------------------------------------------------------
    def why_not(self, job: dict[str, Any]) -> dict[str, Any]:
        filtered: dict[str, int] = {}
        exhausted: dict[str, int] = {}
        datacenters = job.get("Datacenters") or ["*"]
        if ("*" not in datacenters and "dc1" not in datacenters) or job.get("NodePool", "default") not in (
            "default",
            "all",
        ):
            return {"NodesEvaluated": 0, "NodesAvailable": {}}
        for c in job.get("Constraints") or []:
            if not _satisfied(c):
                filtered[f"{c['LTarget']} {c['Operand']} {c.get('RTarget', '')}".strip()] = 1
        for group in job["TaskGroups"]:
            for task in group["Tasks"]:
                resources = task.get("Resources") or {}
                if resources.get("Devices"):  # the node has none: filtered, as Nomad's feasibility check does
                    filtered["missing devices"] = 1
                if task["Driver"] not in NODE_DRIVERS:
                    filtered["missing drivers"] = 1
                if resources.get("Cores", 0) > (os.cpu_count() or 1):
                    exhausted["cores"] = 1
                if resources.get("MemoryMB", 300) > NODE_MEMORY_MB - self.memory_in_use():
                    exhausted["memory"] = 1
        if not (filtered or exhausted):
            return {}
        return {
            "NodesEvaluated": 1,
            "NodesFiltered": 1 if filtered else 0,
            "NodesAvailable": {"dc1": 1},
            "ConstraintFiltered": filtered or None,
            "NodesExhausted": 1 if exhausted else 0,
            "DimensionExhausted": exhausted or None,
        }

    def memory_in_use(self) -> int:
        """The MB the node's live allocations hold (each its task's ``MemoryMB``, as Nomad reserves it)."""
        with self.changed:
            live = [a for a in self.allocs.values() if a["DesiredStatus"] == "run" and a["ClientStatus"] in LIVE]
        return sum((a["Job"]["TaskGroups"][0]["Tasks"][0].get("Resources") or {}).get("MemoryMB", 300) for a in live)

    def register(self, job: dict[str, Any]) -> dict[str, Any]:
        if (job.get("ParameterizedJob") and not job.get("Dispatched")) or job.get("Periodic"):
            # (run by a dispatch or a tick: no evaluation now)
            with self.changed:
                self.jobs[job["ID"]] = {"Job": job, "Allocs": []}
                self.bump(job)
            return {"EvalID": "", "JobModifyIndex": self.index}
        eval_id = str(uuid.uuid4())
        evaluation = {"ID": eval_id, "JobID": job["ID"], "Status": "pending", "Type": job["Type"]}
        with self.changed:
            self.jobs[job["ID"]] = {"Job": job, "Allocs": []}
            self.evals[eval_id] = evaluation
            self.bump(evaluation)
        threading.Thread(target=self.schedule, args=(job, evaluation), daemon=True).start()
        return {"EvalID": eval_id, "JobModifyIndex": self.index}

    def dispatch(self, parent: dict[str, Any], meta: dict[str, str]) -> dict[str, Any] | str:
        """A child of the parameterized ``parent`` with ``meta``, registered; or why not (Nomad's words)."""
        allowed = parent["ParameterizedJob"]
        required, optional = allowed.get("MetaRequired") or [], allowed.get("MetaOptional") or []
        if unpermitted := sorted(key for key in meta if key not in required and key not in optional):
            return f"Dispatch request included unpermitted metadata keys: {unpermitted}"
        if missing := [key for key in required if key not in meta]:
            return f"Dispatch did not provide required meta keys: {missing}"
        child = self.child(parent, f"dispatch-{int(time.time())}-{uuid.uuid4().hex[:8]}", Dispatched=True)
        child["Meta"] = {**(parent.get("Meta") or {}), **meta}
        registered = self.register(child)
        return {"DispatchedJobID": child["ID"], "EvalID": registered["EvalID"], "Index": self.index}

    def force(self, parent: dict[str, Any]) -> dict[str, Any]:
        """The periodic ``parent`` launched now: its child ``<parent>/periodic-<time>``, registered."""
        child = self.child(parent, f"periodic-{int(time.time())}")
        child.pop("Periodic")
        return {"EvalID": self.register(child)["EvalID"], "Index": self.index}

    @staticmethod
    def child(parent: dict[str, Any], suffix: str, **fields: Any) -> dict[str, Any]:
        child = {k: v for k, v in parent.items() if k not in ("ModifyIndex", "CreateIndex")}
        child_id = f"{parent['ID']}/{suffix}"
        child.update(ID=child_id, Name=child_id, ParentID=parent["ID"], **fields)
        return child

    def schedule(self, job: dict[str, Any], evaluation: dict[str, Any]) -> None:
        time.sleep(0.05)
        failed = self.why_not(job)
        if failed:
            evaluation.update(
                Status="complete", FailedTGAllocs={job["TaskGroups"][0]["Name"]: failed}, BlockedEval=str(uuid.uuid4())
            )
            self.bump(evaluation)
            return
        group = job["TaskGroups"][0]
        task = group["Tasks"][0]
        runs = []
        for index in range(int(group.get("Count", 1))):  # (a group's Count allocations, each its own index)
            alloc = self.allocate(job, group, task, index)
            if alloc is None:  # deregistered meanwhile
                break
            runs.append(threading.Thread(target=self.run, args=(alloc, task)))
        with self.changed:
            evaluation["Status"] = "complete"
            self.bump(evaluation)
        for run in runs:
            run.start()
        for run in runs:
            run.join()

    def allocate(
        self, job: dict[str, Any], group: dict[str, Any], task: dict[str, Any], index: int
    ) -> dict[str, Any] | None:
        alloc = {
            "ID": str(uuid.uuid4()),
            "Name": f"{job['ID']}.{group['Name']}[{index}]",
            "JobID": job["ID"],
            "Job": job,
            "Namespace": job.get("Namespace", "default"),
            "TaskGroup": group["Name"],
            "DesiredStatus": "run",
            "ClientStatus": "pending",
            "TaskStates": {
                task["Name"]: {
                    "State": "pending",
                    "Failed": False,
                    "StartedAt": ZERO_TIME,  # (Go's zero time, as Nomad writes it before the task starts)
                    "Events": [_event("Received")],
                }
            },
        }
        with self.changed:
            registered = self.jobs.get(job["ID"])
            if registered is None or registered["Job"] is not job:
                return None
            self.allocs[alloc["ID"]] = alloc
            registered["Allocs"].append(alloc["ID"])
            self.bump(alloc)
        return alloc

    def run(self, alloc: dict[str, Any], task: dict[str, Any]) -> None:
        state = alloc["TaskStates"][task["Name"]]
        try:
            start = self.start_container if task["Driver"] == "docker" else self.start_process
            wait = start(alloc, task)
        except TemplateError as exc:  # (Nomad's task runner, parsing the task's config before any driver)
            state["Events"].append(_event("Failed Validation", ValidationError=str(exc), DisplayMessage=str(exc)))
            state.update(State="dead", Failed=True)
            alloc["ClientStatus"] = "failed"
            self.bump(alloc)
            self.release(alloc["ID"])
            return
        except (DockerException, OSError) as exc:
            said = f"Failed to start container: {exc.stderr or exc}" if isinstance(exc, DockerException) else str(exc)
            state["Events"].append(_event("Driver Failure", DriverError=said))
            state.update(State="dead", Failed=True)
            alloc["ClientStatus"] = "failed"
            self.bump(alloc)
            self.release(alloc["ID"])
            return
        with self.changed:
            stopping = alloc.get("DesiredStatus") == "stop"
            if not stopping:
                state["Events"].append(_event("Started"))
                state["State"], state["StartedAt"] = "running", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                alloc["ClientStatus"] = "running"
                self.bump(alloc)
        if stopping:  # deregistered while it started, before the stop could find it: stopped now
            self.stop_allocs([alloc])
            return
        code = wait()
        task_api = self.task_apis.pop(alloc["ID"], None)
        if task_api is not None:  # (the task has ended: its socket goes)
            task_api.stop()
        if alloc["ClientStatus"] == "lost":  # (its node is gone: nothing more is heard of the task)
            return
        if alloc.get("DesiredStatus") == "stop":  # stopped by a deregistration: killed, as Nomad says it
            with self.changed:
                state["Events"] += [_terminated(code), _event("Killed")]
                state.update(State="dead", Failed=False)
                alloc["ClientStatus"] = "complete"
                self.bump(alloc)
            return
        state["Events"].append(_terminated(code))
        state.update(State="dead", Failed=code != 0)
        alloc["ClientStatus"] = "complete" if code == 0 else "failed"
        self.bump(alloc)

    def folders(self, alloc: dict[str, Any], task: dict[str, Any]) -> tuple[Path, dict[str, str]]:
        """The allocation's folder, with its task's ``alloc``, ``local``, ``secrets`` and ``tmp`` in it (open to
        the task's user, whichever it is), and the variables that name them on this machine; the task's
        identity given to it as its ``Identity`` block asks, and its Task API opened."""
        root = Path(tempfile.mkdtemp(prefix="nomad-double-alloc-"))
        task_dir = root / task["Name"]
        alloc_dir = root / "alloc"
        for folder in (alloc_dir, alloc_dir / "logs", task_dir / "local", task_dir / "secrets", task_dir / "tmp"):
            folder.mkdir(parents=True)
            folder.chmod(0o777)
        root.chmod(0o755)
        self.roots[alloc["ID"]] = root
        named = {
            "NOMAD_ALLOC_DIR": str(root / "alloc"),
            "NOMAD_TASK_DIR": str(task_dir / "local"),
            "NOMAD_SECRETS_DIR": str(task_dir / "secrets"),
        }
        identity = task.get("Identity")
        if identity is None:
            return root, named
        token = self.sign(alloc, task)
        if identity.get("Env"):
            named["NOMAD_TOKEN"] = token
        self.task_apis[alloc["ID"]] = TaskApi(self.api, task_dir / "secrets" / "api.sock")
        return root, named

    def sign(self, alloc: dict[str, Any], task: dict[str, Any]) -> str:
        """The task's default workload identity, with Nomad's claims."""
        job, now = alloc["Job"], int(time.time())
        job_id = job.get("ParentID") or job["ID"]  # (GetIDforWorkloadIdentity: a child's is its parent's)
        claims = {
            "nomad_namespace": alloc["Namespace"],
            "nomad_job_id": job_id,
            "nomad_allocation_id": alloc["ID"],
            "nomad_task": task["Name"],
            "sub": ":".join(("global", alloc["Namespace"], job_id, alloc["TaskGroup"], task["Name"], "default")),
            "aud": IDENTITY_AUDIENCE,
            "iat": now,
            "nbf": now,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(claims, self.signing_key, algorithm="HS256")

    def workload(self, secret: str | None) -> dict[str, Any] | None:
        """The claims of the workload identity ``secret`` is, while its allocation is not terminal; else
        ``None``."""
        if not secret or secret.count(".") != 2:
            return None
        try:
            claims = jwt.decode(secret, self.signing_key, algorithms=["HS256"], audience=IDENTITY_AUDIENCE)
        except jwt.PyJWTError:
            return None
        alloc = self.allocs.get(claims.get("nomad_allocation_id", ""))
        live = alloc is not None and alloc["DesiredStatus"] == "run" and alloc["ClientStatus"] in ("pending", "running")
        return claims if live else None

    def start_container(self, alloc: dict[str, Any], task: dict[str, Any]) -> Callable[[], int]:
        config, resources = task["Config"], task.get("Resources") or {}
        cpus = resources.get("Cores") or (resources.get("CPU", 100) / 1000)
        _, named = self.folders(alloc, task)
        seen = {**named, **CONTAINER_FOLDERS}
        env = {**(task.get("Env") or {}), **_runtime_env(alloc, task), **seen}
        mounts = [(named[name], where) for name, where in CONTAINER_FOLDERS.items()]
        # Nomad's docker driver: ``entrypoint`` replaces the image's, ``command`` and ``args`` are its CMD.
        entrypoint = _interpolated(config.get("entrypoint") or [], env)
        argv = _interpolated([*([config["command"]] if "command" in config else []), *config.get("args", [])], env)
        container = self.docker.run(
            config["image"],
            entrypoint[1:] + argv,
            entrypoint=entrypoint[0] if entrypoint else None,
            detach=True,
            envs=env,
            volumes=mounts,
            cpus=cpus,
            memory=f"{resources.get('MemoryMB', 300)}m",
            labels={**self.labels, LABEL: alloc["ID"]},
            cap_drop=["ALL"],
            security_options=["no-new-privileges"],
        )
        self.started[alloc["ID"]] = container.id
        return lambda: int(self.docker.container.wait(container.id))

    def start_process(self, alloc: dict[str, Any], task: dict[str, Any]) -> Callable[[], int]:
        """A raw_exec task: a process of the client's, in a task folder of its allocation's, with the client's
        environment less Nomad's denylist, its output in the allocation's log files."""
        root, named = self.folders(alloc, task)
        task_dir = root / task["Name"]
        client = {k: v for k, v in os.environ.items() if k not in ENV_DENYLIST}
        env = {**client, **(task.get("Env") or {}), **_runtime_env(alloc, task), **named}
        config, logs = task["Config"], task.get("LogConfig") or {}
        limit, kept = int(logs.get("MaxFileSizeMB", 10)) << 20, int(logs.get("MaxFiles", 10))
        argv = _interpolated([config["command"], *config.get("args", [])], env)
        process = subprocess.Popen(
            argv,
            cwd=task_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        run = RawExec(process, root, task["Name"], (limit, kept), task.get("KillSignal") or "SIGINT")
        self.started[alloc["ID"]] = run
        return run.wait

    def deregister(self, job_id: str) -> None:
        """The job forgotten and its allocations told to stop: Nomad answers a purge at once and its client
        stops the tasks after, each on its own. The allocations stay listed under the job's ID until they
        are collected."""
        job = self.jobs.pop(job_id, None)
        allocs = [self.allocs[a] for a in (job or {}).get("Allocs", [])]
        with self.changed:
            for alloc in allocs:
                alloc["DesiredStatus"] = "stop"
                self.bump(alloc)
            for alloc in allocs:
                stopping = threading.Thread(target=self.stop_allocs, args=([alloc],))
                self.stopping.append(stopping)
                stopping.start()

    def stop_allocs(self, allocs: list[dict[str, Any]]) -> None:
        for alloc in allocs:
            started = self.started.pop(alloc["ID"], None)
            if isinstance(started, str):
                self.remove_container(started)
            elif started is not None:
                started.stop(alloc["Job"]["TaskGroups"][0]["Tasks"][0].get("KillTimeout", 5_000_000_000) / 1e9)
            self.release(alloc["ID"])
            with self.changed:
                if alloc["ClientStatus"] in ("pending", "running"):
                    alloc["ClientStatus"] = "complete"
                    self.bump(alloc)

    def remove_container(self, container: str) -> None:
        """Remove a docker task's container, again while the engine still lists it: Docker's engine can leave
        one removed just as it started in its list (dead), still holding its image, which a later test
        untagging that image then meets."""
        for _ in range(40):
            with contextlib.suppress(DockerException):
                self.docker.container.remove(container, force=True)
            if not self.docker.container.exists(container):
                return
            time.sleep(0.25)

    def lose(self, alloc_id: str) -> bool:
        """The allocation's node lost (its heartbeats missed): Nomad's servers mark the allocation ``lost`` and
        want it stopped, its task's state stays as last reported (no ``Terminated`` event), and with no
        reschedule attempts nothing replaces it. The double ends the task, as the node would on its return.
        Whether there was such a running allocation."""
        alloc = self.allocs.get(alloc_id)
        if alloc is None or alloc["ClientStatus"] not in ("pending", "running"):
            return False
        with self.changed:
            alloc.update(
                ClientStatus="lost", DesiredStatus="stop", ClientDescription="alloc is lost since its node is down"
            )
            self.bump(alloc)
        self.stop_allocs([alloc])
        return True

    def release(self, alloc_id: str) -> None:
        """The allocation's Task API closed and its folder removed (its task has ended, or never started)."""
        task_api = self.task_apis.pop(alloc_id, None)
        if task_api is not None:
            task_api.stop()
        root = self.roots.pop(alloc_id, None)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def stop(self) -> None:
        """End every task still running, and wait for each (the double is going away)."""
        for job_id in list(self.jobs):
            self.deregister(job_id)
        for stopping in list(self.stopping):
            stopping.join()

    def logs(self, alloc_id: str, kind: str, follow: bool, offset: int) -> Iterator[bytes]:
        """``StreamFrame`` objects of the task's ``kind`` output, as Nomad's client writes them, then heartbeats
        while followed."""
        alloc = self.allocs[alloc_id]
        task = next(iter(alloc["TaskStates"]))  # (one task a group, as @nomad writes its jobs)
        file = f"alloc/logs/{task}.{kind}.0"
        started = self.started.get(alloc_id)
        if isinstance(started, str):
            yield from self.container_frames(started, kind, follow, offset, file)
        elif started is not None:
            yield from started.frames(kind, follow, offset)
        while follow:  # the task has ended: Nomad keeps the stream, with heartbeats, until the reader goes
            yield b"{}"
            time.sleep(HEARTBEAT_S)

    def container_frames(self, container: str, kind: str, follow: bool, offset: int, file: str) -> Iterator[bytes]:
        # Followed while the task runs, then read once more whole: the followed stream can end before the task's
        # last bytes when they have no newline.
        sent = 0
        for stream in (follow, False):
            seen = 0
            with contextlib.suppress(DockerException):
                for source, data in self.docker.container.logs(container, follow=stream, stream=True):
                    if source != kind:
                        continue
                    start, seen = seen, seen + len(data)
                    if seen > max(sent, offset):
                        piece = data[max(sent, offset) - start :]
                        sent = seen
                        yield _frame(piece, seen, file)


def _terminated(code: int) -> dict[str, Any]:
    """The ``Terminated`` event of a task that ended with ``code`` (a process's, negative when a signal ended
    it; a container's, 128 plus the signal then, as Docker reports it, Nomad's docker driver passes it on
    with no signal). Nomad's executor (raw_exec, exec) reports a signalled process as ``ExitCode`` 128 plus
    the signal and ``Signal`` the signal (``drivers/shared/executor``)."""
    if code < 0:
        return _event("Terminated", ExitCode=128 - code, Signal=-code)
    return _event("Terminated", ExitCode=code, Signal=0)


def _frame(data: bytes, offset: int, file: str) -> bytes:
    return json.dumps({"Data": base64.b64encode(data).decode(), "Offset": offset, "File": file}).encode()


class TaskApi:
    """An allocation's Task API: the agent's HTTP API on a Unix socket in the task's ``secrets`` folder,
    served in a thread of its own; its requests carry ``task_api`` in their scope."""

    def __init__(self, api: Any, path: Path) -> None:
        async def marked(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await api({**scope, "task_api": True}, receive, send)

        config = uvicorn.Config(marked, uds=str(path), lifespan="off", log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)


class RawExec:
    """A raw_exec task's process, its output written to the allocation's log files as Nomad's log collector
    writes them: ``alloc/logs/<task>.<kind>.<n>``, the next file begun when one reaches the task's
    ``LogConfig.MaxFileSizeMB`` (a write split across the two), the oldest deleted once there are more than
    its ``MaxFiles`` (``logs``: those two, in bytes and files)."""

    def __init__(
        self, process: subprocess.Popen, root: Path, task: str, logs: tuple[int, int], kill_signal: str
    ) -> None:
        self.process, self.root, self.task = process, root, task
        self.limit, self.kept = logs
        self.kill_signal = signal.Signals[kill_signal]
        self.logs = root / "alloc" / "logs"
        for kind in ("stdout", "stderr"):
            (self.logs / f"{task}.{kind}.0").touch()
        self.pumps = [
            threading.Thread(target=self.pump, args=(pipe, kind), daemon=True)
            for pipe, kind in ((process.stdout, "stdout"), (process.stderr, "stderr"))
        ]
        for pump in self.pumps:
            pump.start()

    def path(self, kind: str, index: int) -> Path:
        return self.logs / f"{self.task}.{kind}.{index}"

    def pump(self, pipe: Any, kind: str) -> None:
        index, size = 0, 0
        out = self.path(kind, index).open("ab")
        try:
            while chunk := pipe.read1(64 * 1024):
                while chunk:
                    piece, chunk = chunk[: self.limit - size], chunk[self.limit - size :]
                    out.write(piece)
                    out.flush()
                    size += len(piece)
                    if size >= self.limit:
                        out.close()
                        index, size = index + 1, 0
                        out = self.path(kind, index).open("ab")
                        self.path(kind, index - self.kept).unlink(missing_ok=True)
        finally:
            out.close()

    def wait(self) -> int:
        """The exit code, once the process has ended and all it wrote is in the files."""
        code = self.process.wait()
        for pump in self.pumps:
            pump.join()
        return code

    def stop(self, kill_timeout_s: float) -> None:
        """As Nomad's client stops a task: its ``KillSignal`` (SIGINT unless the task names one), then SIGKILL
        once its ``KillTimeout`` has passed."""
        for number, wait_s in ((self.kill_signal, kill_timeout_s), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, number)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(wait_s)
                break
        self.wait()

    def done(self) -> bool:
        return self.process.poll() is not None and not any(pump.is_alive() for pump in self.pumps)

    def indexes(self, kind: str) -> list[int]:
        """The numbers of the ``kind`` log's files still there, in order."""
        return sorted(int(path.name.rsplit(".", 1)[1]) for path in self.logs.glob(f"{self.task}.{kind}.*"))

    def after(self, kind: str, index: int) -> int | None:
        """The first of the ``kind`` log's files still there after file ``index``."""
        return next((n for n in self.indexes(kind) if n > index), None)

    def start(self, kind: str, offset: int) -> tuple[int, int]:
        """Where an ``origin=start`` offset falls: counted forward through the files still there, and held at
        the end of the last, as Nomad's ``findClosest`` does; the file's number and the offset in it."""
        sizes = []
        for n in self.indexes(kind):
            with contextlib.suppress(FileNotFoundError):  # (rotated out while listed)
                sizes.append((n, self.path(kind, n).stat().st_size))
        for n, size in sizes:
            if offset <= size or n == sizes[-1][0]:
                return n, min(offset, size)
            offset -= size
        return 0, 0

    def frames(self, kind: str, follow: bool, offset: int) -> Iterator[bytes]:
        """The ``kind`` log from ``offset`` (counted across the files still there, as Nomad's ``origin=start``
        offsets are) as frames, each naming its file with the offset reached in it; followed while the task
        runs. As Nomad's stream (``client/fs_endpoint.go``, ``logs`` and ``streamFile``): a file deleted under
        the reader (rotated out) ends with a ``file deleted`` frame once its bytes are read, and the stream
        goes on with the next file there; one rotated out before it was opened is passed over."""
        index, offset = self.start(kind, offset)
        quiet_since = time.monotonic()
        while True:
            try:
                log = self.path(kind, index).open("rb")
            except FileNotFoundError:  # (rotated out before it was opened: a newer one is there)
                index, offset = self.after(kind, index), 0
                continue
            with log:
                log.seek(offset)
                while True:
                    done = self.done()  # (before reading: what it wrote last is then read)
                    later = self.after(kind, index)  # (before reading too: what this file got meanwhile is read)
                    data = log.read(64 * 1024)
                    file = f"alloc/logs/{self.path(kind, index).name}"
                    if data:
                        yield _frame(data, log.tell(), file)
                        quiet_since = time.monotonic()
                    elif later is not None:
                        if not self.path(kind, index).exists():
                            yield json.dumps({"File": file, "FileEvent": DELETED, "Offset": log.tell()}).encode()
                        index, offset = later, 0
                        break
                    elif done or not follow:
                        return
                    else:
                        if time.monotonic() - quiet_since >= HEARTBEAT_S:
                            yield b"{}"
                            quiet_since = time.monotonic()
                        time.sleep(0.05)


def _runtime_env(alloc: dict[str, Any], task: dict[str, Any]) -> dict[str, str]:
    """What Nomad's client adds to every task's environment (its "runtime environment" docs): its ids, its
    resources (MHz of CPU and MB of memory; Nomad's defaults where the task names none), and
    the job's and task's ``Meta`` as ``NOMAD_META_<key>`` (as written and upper-cased; a character a
    variable's name cannot hold, but ``.``, as ``_``), a dispatched job's optional keys it was not given as
    empty strings."""
    job = alloc["Job"]
    unset = (job.get("ParameterizedJob") or {}).get("MetaOptional") or [] if job.get("Dispatched") else []
    meta = {**dict.fromkeys(unset, ""), **(job.get("Meta") or {}), **(task.get("Meta") or {})}
    env = {
        f"NOMAD_META_{name}": value
        for key, value in meta.items()
        for name in {re.sub(r"[^A-Za-z0-9_.]", "_", key), re.sub(r"[^A-Za-z0-9_.]", "_", key).upper()}
    }
    if alloc["Job"].get("ParentID"):
        env["NOMAD_JOB_PARENT_ID"] = alloc["Job"]["ParentID"]
    return env | {
        "NOMAD_ALLOC_ID": alloc["ID"],
        "NOMAD_ALLOC_NAME": alloc["Name"],
        "NOMAD_ALLOC_INDEX": alloc["Name"].rsplit("[", 1)[1].rstrip("]"),
        "NOMAD_JOB_ID": alloc["JobID"],
        "NOMAD_JOB_NAME": alloc["JobID"],
        "NOMAD_GROUP_NAME": alloc["TaskGroup"],
        "NOMAD_TASK_NAME": task["Name"],
        "NOMAD_NAMESPACE": alloc["Namespace"],
        "NOMAD_DC": "dc1",
        "NOMAD_REGION": "global",
        "NOMAD_CPU_LIMIT": str((task.get("Resources") or {}).get("CPU", 100)),
        "NOMAD_MEMORY_LIMIT": str((task.get("Resources") or {}).get("MemoryMB", 300)),
    }


class TemplateError(ValueError):
    """A task's config that Nomad's HCL parser refuses."""


def _interpolated(argv: list[str], env: dict[str, str]) -> list[str]:
    """A task's command and arguments as Nomad's task runner reads them: every string of a task's config
    is an HCL template (``hclutils.ParseHclInterface`` over its JSON), so ``$${`` and ``%%{`` are a literal
    ``${`` and ``%{``, ``${NAME}`` is the task's variable ``NAME`` (its own and the runtime's, or a node
    attribute), and any other ``${...}`` or ``%{...}`` (an unknown variable, a shell's ``${X:-y}``, a
    directive) fails the task's validation (``TemplateError``)."""
    return [_template(arg, env) for arg in argv]


def _template(text: str, env: dict[str, str]) -> str:
    out, at = [], 0
    while at < len(text):
        two, three = text[at : at + 2], text[at : at + 3]
        if three in ("$${", "%%{"):
            out.append(three[1:])
            at += 3
        elif two in ("${", "%{"):
            end = text.find("}", at)
            name = text[at + 2 : end] if end != -1 else ""
            value = env.get(name, NODE.get("${" + name + "}")) if two == "${" else None
            if value is None:
                raise TemplateError(f"failed to parse config: unknown variable or bad template {text[at : at + 40]}")
            out.append(value)
            at = end + 1
        else:
            out.append(text[at])
            at += 1
    return "".join(out)


def _labelled(block: dict[str, Any]) -> list[tuple[str, Any]]:
    """A parsed HCL block's labelled entries (python-hcl2 adds ``__``-keys of its own)."""
    return [(k, v) for k, v in block.items() if not k.startswith("__")]


def _satisfied(constraint: dict[str, Any]) -> bool:
    value, wanted, operator = NODE.get(constraint["LTarget"]), constraint.get("RTarget", ""), constraint["Operand"]
    if operator in ("=", "==", "is"):
        return value == wanted
    if operator in ("!=", "not"):
        return value != wanted
    if operator == "is_set":
        return value is not None
    if operator == "is_not_set":
        return value is None
    return False  # the double knows no other operator: nothing satisfies it


def _event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"Type": kind, "Time": time.time_ns(), "DisplayMessage": fields.get("DriverError", ""), **fields}


def app(token: str | None, acl_bootstrap: bool = False) -> FastAPI:
    api, cluster = FastAPI(), Cluster()
    api.state.cluster = cluster
    cluster.api = api
    acl = Acl(token) if token or acl_bootstrap else None

    @api.middleware("http")
    async def check_acl(request: Request, call_next):
        secret = request.headers.get("X-Nomad-Token")
        workload = cluster.workload(secret)
        if request.scope.get("task_api") and not secret:  # (ACLs or not: 401, as Nomad's authMiddleware answers)
            return PlainTextResponse("Unauthorized", status_code=401)
        if request.scope.get("task_api") and acl is not None and workload is None and secret not in acl.tokens:
            return PlainTextResponse("Permission denied", status_code=403)  # (without ACLs, any token will do)
        if acl is not None:
            namespace = request.query_params.get("namespace")
            if not namespace and request.method in ("PUT", "POST") and request.url.path == "/v1/jobs":
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    namespace = json.loads(await request.body())["Job"].get("Namespace")
            namespace = namespace or "default"
            refused = acl.refusal(request.method, request.url.path, namespace, secret, workload)
            if refused:
                return PlainTextResponse(refused, status_code=403)
        return await call_next(request)

    @api.get("/v1/status/leader")
    def leader() -> str:
        return "127.0.0.1:4647"

    requests: list[dict[str, Any]] = []

    @api.middleware("http")
    async def record(request: Request, call_next):
        if not request.url.path.startswith("/_double/"):
            requests.append({"method": request.method, "path": request.url.path, "query": dict(request.query_params)})
        return await call_next(request)

    @api.post("/_double/allocation/{alloc_id}/lose")
    def lose(alloc_id: str):
        """The double's own: the allocation's node is lost (Nomad's servers decide it when heartbeats stop)."""
        return {"lost": cluster.lose(alloc_id)}

    @api.get("/_double/requests")
    def requests_made() -> list[dict[str, Any]]:
        """The double's own (no agent has it): every request it was sent, for tests of how the client asks."""
        return requests

    @api.middleware("http")
    async def acl_enabled(request: Request, call_next):
        if acl is None and request.url.path.startswith("/v1/acl/"):
            return PlainTextResponse("ACL support disabled", status_code=400)
        return await call_next(request)

    @api.post("/v1/acl/bootstrap")
    def bootstrap():
        if acl.bootstrapped:
            return PlainTextResponse("ACL bootstrap already done (reset index: 1)", status_code=400)
        acl.bootstrapped = True
        return acl.add_token("Bootstrap Token", "management", [])

    @api.get("/v1/acl/token/self")
    def token_self(request: Request):
        token = acl.tokens.get(request.headers.get("X-Nomad-Token") or "")
        return token if token else PlainTextResponse("ACL token not found", status_code=404)

    @api.post("/v1/acl/token")
    async def create_token(request: Request):
        body = await request.json()
        kind, policies = body.get("Type", "client"), body.get("Policies") or []
        if kind == "client" and not policies:  # (Nomad's validation of a client token)
            return PlainTextResponse("client token missing policies or roles", status_code=400)
        return acl.add_token(body.get("Name", ""), kind, policies)

    @api.post("/v1/acl/policy/{name}")
    async def put_policy(name: str, request: Request):
        body = await request.json()
        wrong = acl.add_policy(name, body.get("Rules", ""), body.get("JobACL"))
        return PlainTextResponse(wrong, status_code=400) if wrong else JSONResponse(None)

    @api.put("/v1/var/{path:path}")
    async def put_variable(path: str, request: Request, namespace: str = "default"):
        body = await request.json()
        items, namespace = body.get("Items"), body.get("Namespace") or namespace
        if not isinstance(items, dict) or not all(isinstance(v, str) for v in items.values()):
            return PlainTextResponse("Request decode failed: Items are strings", status_code=400)
        if not items:
            return PlainTextResponse("variable missing required Items object", status_code=400)
        with cluster.changed:
            variable = {"Namespace": namespace, "Path": path, "Items": items}
            cluster.variables[(namespace, path)] = variable
            cluster.bump(variable)
        return variable

    @api.get("/v1/var/{path:path}")
    def get_variable(path: str, namespace: str = "default"):
        found = cluster.variables.get((namespace, path))
        return found if found else PlainTextResponse("variable not found", status_code=404)

    @api.delete("/v1/var/{path:path}")
    def delete_variable(path: str, namespace: str = "default"):
        cluster.variables.pop((namespace, path), None)
        return JSONResponse(None)

    @api.get("/v1/acl/policy/{name}")
    def get_policy(name: str):
        if name not in acl.policies:
            return PlainTextResponse("ACL policy not found", status_code=404)
        bound = acl.bound.get(name)
        return {"Name": name, "JobACL": {"Namespace": bound[0], "JobID": bound[1]} if bound else None}

    @api.delete("/v1/acl/policy/{name}")
    def delete_policy(name: str):
        for kept in (acl.policies, acl.variable_paths, acl.bound):
            kept.pop(name, None)
        return JSONResponse(None)

    @api.post("/v1/namespace/{name}")
    def put_namespace(name: str):
        cluster.namespaces.add(name)
        return JSONResponse(None)

    @api.get("/v1/nodes")
    def nodes(request: Request) -> list:
        healthy = {"Detected": True, "Healthy": True}
        drivers = {driver: healthy for driver in NODE_DRIVERS}
        node = {"ID": NODE_ID, "Name": NODE["${node.unique.name}"], "Status": "ready", "Drivers": drivers}
        if request.query_params.get("resources") == "true":  # (NodeListStub's, given ?resources=true)
            cores = os.cpu_count() or 1
            node["NodeResources"] = {
                "Cpu": {"CpuShares": cores * NODE_MHZ_PER_CORE, "TotalCpuCores": cores},
                "Memory": {"MemoryMB": NODE_MEMORY_MB},
                "Devices": [],
            }
            node["ReservedResources"] = {"Cpu": {"CpuShares": 0}, "Memory": {"MemoryMB": 0}}
        return [node]

    def blocking(request: Request, get) -> JSONResponse:
        index = int(request.query_params.get("index", 0) or 0)
        wait_s = float(request.query_params.get("wait", "300s").rstrip("s"))
        found, at = cluster.wait(get, index, min(wait_s, 300))
        if found is None:
            return PlainTextResponse("not found", status_code=404)
        return JSONResponse(found, headers={"X-Nomad-Index": str(at)})

    @api.put("/v1/jobs")
    @api.post("/v1/jobs")
    async def register(request: Request):
        body = await request.json()
        try:
            jsonschema.validate(body, SCHEMA)
        except jsonschema.ValidationError as exc:
            return PlainTextResponse(f"1 error occurred: {exc.message}", status_code=400)
        namespace = request.query_params.get("namespace") or body["Job"].get("Namespace") or "default"
        if namespace not in cluster.namespaces:  # (Nomad answers 500 with its validator's words)
            return PlainTextResponse(f'job "{body["Job"]["ID"]}" is in nonexistent namespace "{namespace}"', 500)
        return cluster.register(body["Job"])

    @api.post("/v1/validate/job")
    async def validate(request: Request):
        """As Nomad's validate endpoint answers: 200, with the errors (none: the job would be taken)."""
        try:
            jsonschema.validate(await request.json(), SCHEMA)
            errors = []
        except jsonschema.ValidationError as exc:
            errors = [exc.message]
        said = f"{len(errors)} error occurred:\n\t* {errors[0]}\n\n" if errors else ""
        return {"DriverConfigValidated": True, "ValidationErrors": errors, "Error": said, "Warnings": ""}

    @api.get("/v1/jobs")
    def jobs(prefix: str = "", namespace: str = "default") -> list:
        return [
            {
                "ID": job_id,
                "Status": "running",
                "Meta": entry["Job"].get("Meta"),
                "ParentID": entry["Job"].get("ParentID", ""),
            }
            for job_id, entry in cluster.jobs.items()
            if job_id.startswith(prefix) and (entry["Job"].get("Namespace") or "default") == namespace
        ]

    @api.get("/v1/evaluation/{eval_id}")
    def evaluation(eval_id: str, request: Request):
        return blocking(request, lambda: (e := cluster.evals.get(eval_id), (e or {}).get("ModifyIndex", 0)))

    @api.get("/v1/job/{job_id:path}/allocations")
    def allocations(job_id: str, request: Request):
        def get():  # (a purged job's allocations are still listed, by its ID, until collected)
            if job_id in cluster.jobs:
                allocs = [cluster.allocs[a] for a in cluster.jobs[job_id]["Allocs"]]
            else:
                allocs = [a for a in list(cluster.allocs.values()) if a["JobID"] == job_id]
            return allocs, max((a["ModifyIndex"] for a in allocs), default=0)

        return blocking(request, get)

    @api.get("/v1/allocation/{alloc_id}")
    def allocation(alloc_id: str, request: Request):
        def get():
            alloc = cluster.allocs.get(alloc_id)
            if alloc is None:
                return None, 0
            return alloc, alloc["ModifyIndex"]

        return blocking(request, get)

    @api.delete("/v1/job/{job_id:path}")
    def deregister(job_id: str, purge: bool = False) -> dict:
        if job_id not in cluster.jobs:
            return PlainTextResponse("job not found", status_code=404)
        cluster.deregister(job_id)
        return {"EvalID": str(uuid.uuid4())}

    @api.post("/v1/job/{job_id:path}/dispatch")
    async def dispatch(job_id: str, request: Request):
        parent = cluster.jobs.get(job_id)
        if parent is None:  # (Nomad's plain errors here are 500s)
            return PlainTextResponse("parameterized job not found", status_code=500)
        if not parent["Job"].get("ParameterizedJob"):
            return PlainTextResponse(f'Specified job "{job_id}" is not a parameterized job', status_code=500)
        meta = (await request.json()).get("Meta") or {}
        if not all(isinstance(v, str) for v in meta.values()):
            return PlainTextResponse("Request body decode failed: Meta values are strings", status_code=400)
        dispatched = cluster.dispatch(parent["Job"], meta)
        return PlainTextResponse(dispatched, status_code=500) if isinstance(dispatched, str) else dispatched

    @api.post("/v1/job/{job_id:path}/periodic/force")
    def force(job_id: str):
        parent = cluster.jobs.get(job_id)
        if parent is None or not parent["Job"].get("Periodic"):
            return PlainTextResponse("can't force run non-periodic job", status_code=500)
        return cluster.force(parent["Job"])

    @api.get("/v1/job/{job_id:path}")
    def job(job_id: str):
        entry = cluster.jobs.get(job_id)
        return entry["Job"] if entry else PlainTextResponse("job not found", status_code=404)

    @api.get("/v1/client/fs/logs/{alloc_id}")
    def logs(alloc_id: str, task: str, type: str, follow: bool = False, offset: int = 0, origin: str = "start"):
        if alloc_id not in cluster.allocs:
            return PlainTextResponse("unknown allocation", status_code=404)
        if alloc_id not in cluster.started:  # (Nomad's words for a task that has not started)
            return PlainTextResponse("task not started yet. No logs available", status_code=404)
        return StreamingResponse(cluster.logs(alloc_id, type, follow, offset), media_type="application/json")

    return api


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token")
    parser.add_argument("--acl-bootstrap", action="store_true")
    # An agent's `tls` block: `cert_file`, `key_file`, and `ca_file` with `verify_https_client`.
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-client-ca")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE on every docker task's container")
    args = parser.parse_args()
    api = app(args.token, args.acl_bootstrap)
    api.state.cluster.labels = dict(label.split("=", 1) for label in args.label)
    tls = {"ssl_certfile": args.tls_cert, "ssl_keyfile": args.tls_key}
    if args.tls_client_ca:
        tls.update(ssl_ca_certs=args.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    # Stopped, it drops what is still open (blocking queries, followed logs) after 2 s, as an agent that
    # restarts does, then ends its tasks.
    uvicorn.run(api, host="127.0.0.1", port=args.port, log_level="warning", timeout_graceful_shutdown=2, **tls)
    api.state.cluster.stop()


if __name__ == "__main__":
    main()
