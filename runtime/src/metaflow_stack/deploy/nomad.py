"""Render a Nomad job from ``infra/nomad`` with its variables, check it offline, and submit it.

The job file stays the HCL a Nomad user would run themselves
(``nomad job run -var-file=...``); the runtime writes the variable file beside
a copy of it whose job label (the job's ID, which HCL cannot take from a
variable) is the ``name`` variable, so two functions are two jobs.

Offline, the job is parsed as HCL2, every variable is checked against its
declaration (known, typed, required ones given), and the job must run a
Docker task from ``var.image``. A Nomad agent does the rest: with
``NOMAD_ADDR`` set, ``submit`` has the agent parse the job with the variables
and registers it through the HTTP API (python-nomad).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaflow_stack.deploy import infra_root, require, write_atomically
from metaflow_stack.errors import StackError

#: HCL2 type constraints the checks understand, and the Python values that satisfy them.
_TYPES = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "${list(string)}": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
    "${map(string)}": lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and isinstance(i, str) for k, i in v.items())
    ),
}


@dataclass(frozen=True)
class NomadJob:
    """A job file and the variables it is run with, checked."""

    source: Path
    hcl: str
    variables: dict[str, Any]

    def var_file(self) -> str:
        """The variables as an HCL variable file (what ``-var-file`` and the parse API take)."""
        return "".join(f"{name} = {_literal(value)}\n" for name, value in sorted(self.variables.items()))

    def cli_vars(self) -> dict[str, str]:
        """The variables as ``-var name=value`` takes them (and the Pulumi provider's ``hcl2.vars``): a string
        as it is, any other value as its HCL literal."""
        return {name: v if isinstance(v, str) else _literal(v) for name, v in sorted(self.variables.items())}


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)} = {_literal(v)}" for k, v in value.items()) + "}"
    # JSON string escapes are HCL's; template sequences must not be interpreted.
    return json.dumps(str(value)).replace("${", "$${").replace("%{", "%%{")


def job_file(name: str) -> Path:
    """``infra/nomad/<name>.nomad.hcl``."""
    path = infra_root() / "nomad" / f"{name}.nomad.hcl"
    if not path.is_file():
        raise StackError(f"no Nomad job {name!r} at {path}", fix="check the job name")
    return path


def _unquote(key: str) -> str:
    return key.strip('"')


def render(name: str, variables: dict[str, Any]) -> NomadJob:
    """The job ``name`` with ``variables``, checked against the job's declarations."""
    hcl2 = require("hcl2")
    source = job_file(name)
    text = source.read_text(encoding="utf-8")
    try:
        document = hcl2.loads(text)
    except Exception as exc:  # the parser raises lark's errors, each naming the line
        raise StackError(f"{source} is not valid HCL: {exc}", fix="correct the job file") from None
    declared = {_unquote(k): v for block in document.get("variable", []) for k, v in block.items()}
    for variable, value in variables.items():
        if variable not in declared:
            known = ", ".join(declared)
            raise StackError(f"{source.name} declares no variable {variable!r}", fix=f"its variables: {known}")
        kind = declared[variable].get("type", "any")
        check = _TYPES.get(kind)
        if check is not None and not check(value):
            raise StackError(
                f"variable {variable!r} of {source.name} must be a {kind.strip('${}')}, not {value!r}",
                fix=f"give {variable} a {kind.strip('${}')}",
            )
    missing = [v for v, spec in declared.items() if "default" not in spec and v not in variables]
    if missing:
        raise StackError(f"{source.name} needs variable(s) {', '.join(missing)}", fix="give them a value")
    _check_runs_the_image(source, document)
    if "name" in variables:
        text = _relabel(source, text, document, str(variables["name"]))
    return NomadJob(source, text, dict(variables))


def _relabel(source: Path, text: str, document: dict[str, Any], job_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", job_id):
        raise StackError(f"{job_id!r} is not a Nomad job ID", fix="use letters, digits, '-', '_' and '.'")
    (label,) = (_unquote(k) for job in document["job"] for k in job)
    relabelled, count = re.subn(rf'^job\s+"{re.escape(label)}"', f'job "{job_id}"', text, count=1, flags=re.M)
    if count != 1:
        raise StackError(f"{source.name} has no top-level job block", fix="restore its job block")
    return relabelled


def _check_runs_the_image(source: Path, document: dict[str, Any]) -> None:
    tasks = [
        task
        for job in document.get("job", [])
        for spec in job.values()
        for group in spec.get("group", [])
        for group_spec in group.values()
        for task in group_spec.get("task", [])
        for task in task.values()
    ]
    if not any(t.get("driver") == '"docker"' and "var.image" in str(t.get("config")) for t in tasks):
        raise StackError(f"{source.name} has no Docker task running var.image", fix="restore the job's task block")


def write(job: NomadJob, folder: Path) -> list[Path]:
    """Write the job file and its variable file: ``nomad job run -var-file=F JOB`` runs them."""
    return [
        write_atomically(folder / job.source.name, job.hcl),
        write_atomically(folder / f"{job.source.name.removesuffix('.nomad.hcl')}.vars.hcl", job.var_file()),
    ]


def _client() -> tuple[Any, Any, str]:
    """python-nomad, a client of the agent at ``NOMAD_ADDR``, and that address; with Nomad's TLS settings as
    ``@nomad`` reads them (its certificate verified, unlike python-nomad's default; this machine's presented)."""
    from metaflow_stack.engines.nomad.client import Settings

    nomad = require("nomad")
    if not os.environ.get("NOMAD_ADDR"):
        fix = "export NOMAD_ADDR=http://<agent>:4646 (and NOMAD_TOKEN when ACLs are on)"
        raise StackError("NOMAD_ADDR is not set", fix=fix)
    s = Settings.from_env({k: v for k, v in os.environ.items() if k != "METAFLOW_NOMAD_ADDR"})
    verify = (s.ca_cert or True) if s.verify else False
    client = nomad.Nomad(address=s.address, token=s.token, timeout=30, verify=verify, cert=s.client_cert or ())
    return nomad, client, s.address


def put_variables(path: str, items: dict[str, str], namespace: str = "default") -> None:
    """Store ``items`` in Nomad Variables at ``path`` of ``namespace`` (where a job's template reads secrets)."""
    nomad, client, address = _client()
    try:
        client.variable.create_variable(path, {"Items": items}, namespace=namespace)
    except nomad.api.exceptions.BaseNomadException as exc:
        detail = getattr(getattr(exc, "nomad_resp", None), "text", "") or str(exc)
        raise StackError(f"Nomad at {address} refused the variables at {path}: {detail.strip()}") from None


def submit(job: NomadJob) -> str:
    """Register the job with the agent at ``NOMAD_ADDR``; return the evaluation id."""
    nomad, client, address = _client()
    try:
        # The agent's own parser applies the variables, exactly as `nomad job run -var-file` would.
        parsed = client.jobs.request(
            "parse", json={"JobHCL": job.hcl, "Variables": job.var_file(), "Canonicalize": True}, method="post"
        ).json()
        registered = client.jobs.register_job({"Job": parsed})
    except nomad.api.exceptions.BaseNomadException as exc:
        detail = getattr(getattr(exc, "nomad_resp", None), "text", "") or str(exc)
        message = f"Nomad at {address} refused the job: {detail.strip()}"
        raise StackError(message, fix="correct the job or its variables") from None
    return str(registered.get("EvalID", ""))
