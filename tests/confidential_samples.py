"""What the ``@confidential`` tests share: the public attestation samples with the time their collateral is
valid at and a policy they pass, an attempt's identity, a flow run's environment, and a tiny flow."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import PROJECT, gramine_path

from metaflow_stack.confidential.attest import TaskIdentity

SAMPLES = PROJECT / "tests" / "data" / "attestation"
#: Inside the samples' collateral window (issued 2025-06-19, next update 2025-07-19).
PINNED = int(datetime.datetime(2025, 7, 1, tzinfo=datetime.UTC).timestamp())
SGX_MR_ENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SGX_MR_SIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
#: What the public SGX sample passes, but for its report_data (it binds another program's data).
SGX_POLICY = f"""
[sgx]
mr_enclave = ["{SGX_MR_ENCLAVE}"]
mr_signer = ["{SGX_MR_SIGNER}"]
isv_prod_id = 0

[tcb]
allowed_statuses = ["UpToDate", "ConfigurationAndSWHardeningNeeded"]
allowed_advisories = ["INTEL-SA-00289", "INTEL-SA-00615"]
"""
IDENTITY = TaskIdentity(flow="ScoreFlow", run="12", step="score", task="3", attempt=0, code_digest="sha256:abc")


def flow_env(root: Path, **extra: str) -> dict[str, str]:
    """A run's environment: Gramine's commands (the double's where Gramine is not installed), its own state
    folder (where enclaves and keys are kept) and local metadata."""
    return {**os.environ, "PATH": gramine_path(), "USER": "tester", "METAFLOW_STACK_STATE_DIR": str(root / "state"),
            "METAFLOW_DEFAULT_METADATA": "local", **extra}  # fmt: skip


def client_json(root: Path, code: str, env: dict[str, str] | None = None) -> object:
    """What ``code`` prints as JSON on its last line, run in a new Python in the workspace (its run's
    environment, ``flow_env``'s unless given), as a user reads the run there."""
    script = f"import json\nfrom metaflow import Flow, namespace\nnamespace(None)\n{code}"
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env or flow_env(root), capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def tiny_flow(folder: Path, decorator: str, body: str = "pass") -> None:
    """``tiny_flow.py`` in ``folder``: a ``start`` step under ``decorator`` running ``body``, then ``end``."""
    (folder / "tiny_flow.py").write_text(f"""from metaflow import FlowSpec, conda, confidential, pypi, step


class TinyFlow(FlowSpec):
    {decorator}
    @step
    def start(self):
        {body}
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TinyFlow()
""")
