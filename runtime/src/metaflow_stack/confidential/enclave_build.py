"""Inside a Gramine step's image, at build time (``gramine/Dockerfile``): the enclave prepared for the
image's own interpreter and paths from what ``step_image`` staged, as ``launcher.enclave`` prepares one on
this machine.

``python -P -m metaflow_stack.confidential.enclave_build /opt/enclave`` renders the manifest (the staged
template, the staged settings and environment, the code under ``code/``), has ``gramine-manifest`` check it
and hash every trusted file, signs it for SGX with the key mounted as a build secret, and leaves
``ready.json`` (the stem and the MRENCLAVE) for the launcher to read back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from metaflow_stack.confidential import gramine
from metaflow_stack.confidential.launcher import Settings, enclave_inputs, interpreter_paths
from metaflow_stack.confidential.manifest import TEMPLATE
from metaflow_stack.confidential.step_enclave import CODE, EXCHANGES, KEY_SECRET, READY, SPEC, StepEnclave
from metaflow_stack.trampolines import exits_in_one_line

#: Where BuildKit mounts a build secret.
SECRETS = Path("/run/secrets")


def prepare(folder: Path) -> gramine.Prepared:
    """The enclave of ``folder`` (the image's ``step_enclave.ENCLAVE``), prepared and signed."""
    spec = StepEnclave.model_validate_json((folder / SPEC).read_text())
    chosen = Settings(mode=spec.mode, enclave_size=spec.enclave_size, threads=spec.threads, policy=None,
                      collateral=None, pccs_url=None, isv_prod_id=spec.isv_prod_id, isv_svn=spec.isv_svn)  # fmt: skip
    sys_path = interpreter_paths((CODE, EXCHANGES, spec.datastore))  # (``python -P``: not the build's folder)
    inputs = enclave_inputs(Path(CODE), spec.env, EXCHANGES, spec.datastore, chosen, sys_path)
    key = SECRETS / KEY_SECRET if spec.mode == "sgx" else None
    prepared = gramine.prepare(inputs, folder, spec.mode, key, template=folder / TEMPLATE)
    (folder / READY).write_text(json.dumps({"stem": prepared.stem, "mr_enclave": prepared.mr_enclave}))
    return prepared


if __name__ == "__main__":
    with exits_in_one_line("the enclave was not prepared"):
        prepare(Path(sys.argv[1]))
