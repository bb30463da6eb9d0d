"""Inside a Gramine step's image, at build time (``gramine/Dockerfile``): the step's packages installed and
the enclave prepared for the image's own interpreter and paths from what ``step_image`` staged, as
``launcher.enclave`` prepares one on this machine.

``python -P -m metaflow_stack.confidential.enclave_build install /opt/enclave`` installs the step's wheels
(its ``@pypi`` environment as Metaflow solved it: the files it downloaded for the run, mounted into this
build step, nothing resolved or downloaded here) into their own folder, in a layer below the code, and
checks that the runtime the enclave runs still imports with them in front.
``... enclave_build prepare /opt/enclave`` renders the manifest (the staged template, the staged settings
and environment, the code under ``code/``), has ``gramine-manifest`` check it and hash every trusted file,
signs it for SGX with the key mounted as a build secret, and leaves ``ready.json`` (the stem and the
MRENCLAVE) for the launcher to read back.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from metaflow_stack.confidential import gramine, step_enclave
from metaflow_stack.confidential.launcher import ENTRY, Settings, enclave_inputs, interpreter_paths
from metaflow_stack.confidential.manifest import TEMPLATE
from metaflow_stack.errors import StackError
from metaflow_stack.trampolines import exits_in_one_line

#: Where BuildKit mounts a build secret.
SECRETS = Path("/run/secrets")


def install(folder: Path) -> None:
    """The step's wheels staged in ``folder`` installed under ``step_enclave.PACKAGES``, for this image's Python."""
    wanted = step_enclave.StepEnvironment.model_validate_json((folder / step_enclave.ENVIRONMENT).read_text())
    if not wanted.wheels:
        return
    here = "{}.{}".format(*sys.version_info[:2])
    if wanted.python and wanted.python != here:
        raise StackError(
            f"the step's environment was solved for Python {wanted.python}, and its image's Python is {here}",
            fix=f'@pypi(python="{here}") (or @pypi_base), or METAFLOW_STACK_GRAMINE_IMAGE with Python {wanted.python}',
        )
    wheels = [str(folder / step_enclave.WHEELS / name) for name in wanted.wheels]
    gramine.run(
        [shutil.which("uv") or "uv", "pip", "install", "--quiet", "--no-deps", "--no-index", "--compile-bytecode",
         "--python", sys.executable, "--target", step_enclave.PACKAGES, *wheels],
        "the step's wheels did not install",
        fix="pin versions with wheels for Linux on x86-64 and glibc 2.36 (Debian bookworm)",
    )  # fmt: skip
    # The enclave runs the runtime with the step's packages before its own: one they break stops the build.
    gramine.run(
        [sys.executable, "-c", f"import metaflow, {ENTRY}"], "the step's packages break the runtime its enclave runs",
        fix="pin versions of those packages the runtime works with (see its requirements)",
        env={**os.environ, "PYTHONPATH": step_enclave.PACKAGES},
    )  # fmt: skip


def prepare(folder: Path) -> gramine.Prepared:
    """The enclave of ``folder`` (the image's ``step_enclave.ENCLAVE``), prepared and signed."""
    spec = step_enclave.StepEnclave.model_validate_json((folder / step_enclave.SPEC).read_text())
    chosen = Settings(mode=spec.mode, enclave_size=spec.enclave_size, threads=spec.threads, policy=None,
                      collateral=None, pccs_url=None, isv_prod_id=spec.isv_prod_id, isv_svn=spec.isv_svn)  # fmt: skip
    sys_path = interpreter_paths(
        (step_enclave.CODE, step_enclave.EXCHANGES, spec.datastore)
    )  # (``python -P``: not the build's folder)
    if os.path.isdir(step_enclave.PACKAGES):  # the step's own packages: trusted files, as the interpreter's are
        sys_path.append(step_enclave.PACKAGES)
    inputs = enclave_inputs(Path(step_enclave.CODE), spec.env, step_enclave.EXCHANGES, spec.datastore, chosen, sys_path)
    key = SECRETS / step_enclave.KEY_SECRET if spec.mode == "sgx" else None
    prepared = gramine.prepare(inputs, folder, spec.mode, key, template=folder / TEMPLATE)
    (folder / step_enclave.READY).write_text(json.dumps({"stem": prepared.stem, "mr_enclave": prepared.mr_enclave}))
    return prepared


if __name__ == "__main__":
    with exits_in_one_line("the enclave was not prepared"):
        {"install": install, "prepare": prepare}[sys.argv[1]](Path(sys.argv[2]))
