"""Every flow of the flow suite, and the demo, compiles for Argo Workflows with no cluster, and each
WorkflowTemplate is valid by Argo's API schema (hera's models of it); the code package goes to a real
S3 server (moto). On a real cluster the GitHub workflow's kind job deploys them."""

from __future__ import annotations

import ast
import copy
import os
import re
from pathlib import Path

import pytest
from conftest import run_cli

from metaflow_stack.ci import argo_compile
from metaflow_stack.errors import InvalidInput, StackError

FLOWS = sorted((Path(__file__).resolve().parent / "flow_suite" / "flows").glob("*.py"))
DEMO = Path(__file__).resolve().parents[1] / "runtime" / "src" / "metaflow_stack" / "demo" / "hello_flow.py"
#: The examples: each runs a step in a TEE (``@confidential``), which Argo Workflows, running every step as a
#: pod, cannot give it.
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.fixture
def s3_datastore(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("METAFLOW_DEFAULT_DATASTORE", "s3")
    monkeypatch.setenv("METAFLOW_DATASTORE_SYSROOT_S3", f"{s3_bucket}/argo")
    monkeypatch.setenv("METAFLOW_KUBERNETES_NAMESPACE", "metaflow")
    return s3_bucket


def _steps(flow: Path) -> set[str]:
    """The step names of a flow file, read from its source."""
    tree = ast.parse(flow.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and any(getattr(d, "id", None) == "step" for d in node.decorator_list)
    }


@pytest.mark.parametrize("flow", [*FLOWS, DEMO], ids=lambda p: p.stem)
def test_every_flow_compiles_to_a_valid_workflow_template(flow: Path, s3_datastore: str, tmp_path: Path) -> None:
    staged = tmp_path / flow.name
    staged.write_text(flow.read_text())
    template = argo_compile.compile_flow(staged)
    parsed = argo_compile.validate(template)
    assert parsed.kind == "WorkflowTemplate" and parsed.metadata.namespace == "metaflow"
    names = {t.name for t in parsed.spec.templates}
    assert {step.replace("_", "-") for step in _steps(flow)} <= names
    if flow.stem == "scheduled_flow":
        assert '"schedule": "0 3 * * *"' in template["metadata"]["annotations"]["metaflow/cron"]


@pytest.mark.parametrize("flow", EXAMPLES, ids=lambda p: p.stem)
def test_an_example_whose_step_runs_in_a_tee_is_refused_for_argo_in_one_line(
    flow: Path, s3_datastore: str, tmp_path: Path
) -> None:
    """Compiled for Argo Workflows, a ``@confidential`` step would run as a plain pod, outside any enclave:
    the deployment is refused, naming the step (for want of Gramine here; where Gramine is installed, for
    the ``@kubernetes`` Argo gives every step)."""
    assert "@confidential" in flow.read_text()
    staged = tmp_path / flow.name
    staged.write_text(flow.read_text())
    with pytest.raises(StackError) as refused:
        argo_compile.compile_flow(staged)
    assert "does not compile for Argo Workflows" in refused.value.message
    assert re.search(r"step \w+: ", refused.value.message) and "Traceback" not in refused.value.message


def test_a_template_argo_would_refuse_names_the_field(s3_datastore: str, tmp_path: Path) -> None:
    staged = tmp_path / "foreach_flow.py"
    staged.write_text(FLOWS[[f.stem for f in FLOWS].index("foreach_flow")].read_text())
    template = argo_compile.compile_flow(staged)

    wrong_type = copy.deepcopy(template)
    wrong_type["spec"]["templates"][0]["retryStrategy"] = {"limit": {"not": "a count"}}
    with pytest.raises(InvalidInput, match=r"^spec\.templates\.0\.retryStrategy\.limit"):
        argo_compile.validate(wrong_type)
    misspelt = copy.deepcopy(template)
    misspelt["spec"]["entrypont"] = misspelt["spec"].pop("entrypoint")
    with pytest.raises(InvalidInput, match=r"^spec\.entrypont: is not a field of Argo Workflows' WorkflowTemplate"):
        argo_compile.validate(misspelt)


def test_the_cli_checks_flows_and_names_what_it_needs(s3_datastore: str, tmp_path: Path) -> None:
    flow = tmp_path / "branch_flow.py"
    flow.write_text(FLOWS[[f.stem for f in FLOWS].index("branch_flow")].read_text())
    done = run_cli("stack", "ci", "argo-check", str(flow), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith(f"{flow}: WorkflowTemplate branchflow, ")
    assert (tmp_path / "out" / "branch_flow.json").is_file()

    local = run_cli("stack", "ci", "argo-check", str(flow), env={**os.environ, "METAFLOW_DEFAULT_DATASTORE": "local"})
    assert local.returncode == 1
    assert "does not compile for Argo Workflows" in local.stderr and "Traceback" not in local.stderr
