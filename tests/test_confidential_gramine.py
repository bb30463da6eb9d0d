"""A task's Gramine manifest (``gramine/metaflow-task.manifest.template``): rendered with the task's command,
environment and hashed code, checked before Gramine sees it (each unsafe or wrong setting refused naming the
key), the enclave signing key the runtime manages and its MRSIGNER; and, with Gramine (installed in the
GitHub workflow's ``gramine`` job; it cannot be installed on these machines), the manifest checked by
``gramine-manifest`` and a Python program run in ``gramine-direct`` under it (here: against the double in
``tests/gramine_double``, which follows Gramine's documented behaviour)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from metaflow_stack.confidential import gramine
from metaflow_stack.confidential.manifest import ManifestInputs, check, code_files, enclave_bytes, render
from metaflow_stack.errors import InvalidInput, StackError, ToolMissingError

pytest.importorskip("jinja2", reason="pip install 'metaflow-stack[confidential]'")
PYTHON = os.path.realpath(sys.executable)
STDLIB = [sysconfig.get_paths()["stdlib"]]


def _inputs(tmp_path: Path, **changes: object) -> ManifestInputs:
    code = tmp_path / "code"
    (code / ".mf_code").mkdir(parents=True, exist_ok=True)
    (code / "score_flow.py").write_text("print('scored')\n")
    (code / ".mf_code" / "helpers.py").write_text("X = 1\n")
    fields = {
        "python": PYTHON,
        "argv": [PYTHON, "-u", "score_flow.py", "step", "score", "--run-id", "12", "--tag", 'a "quoted" \\ tag'],
        "env": {"PYTHONPATH": f"{code}/.mf_code", "METAFLOW_USER": "ana", "NOTE": "line\nbreak ünïcode"},
        "workdir": str(code),
        "evidence": str(tmp_path / "evidence"),
        "datastore": str(tmp_path / ".metaflow"),
        "runtimedir": "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc",
        "sys_path": [p for p in sys.path if p and os.path.exists(p)],
        "trusted_dirs": [p + "/" if os.path.isdir(p) else p for p in sys.path if p and os.path.exists(p)],
        "code": code_files(code),
        "enclave_size": "2G",
        "max_threads": 16,
    }
    return ManifestInputs(**{**fields, **changes})


def test_the_manifest_fixes_the_tasks_command_environment_and_code(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    manifest = check(render(inputs), "sgx")
    assert manifest["libos"]["entrypoint"] == PYTHON
    assert manifest["loader"]["argv"] == inputs.argv  # quotes, backslashes: exactly the task's command
    env = manifest["loader"]["env"]
    assert env.pop("METAFLOW_STACK_CONFIDENTIAL_TASK") == {"passthrough": True}  # the one the host chooses
    assert {k: v for k, v in env.items() if k != "LD_LIBRARY_PATH"} == inputs.env
    libpython_dirs = [str(Path(library).parent) for library in inputs.interpreter_libraries]
    assert manifest["loader"]["env"]["LD_LIBRARY_PATH"] == ":".join(["/lib", *libpython_dirs, *inputs.library_dirs])
    assert inputs.library_dirs == ["/lib/x86_64-linux-gnu"] or len(set(map(os.path.realpath, inputs.library_dirs))) == 2
    assert (manifest["sgx"]["enclave_size"], manifest["sgx"]["max_threads"]) == ("2G", 16)
    assert manifest["sgx"]["remote_attestation"] == "dcap" and manifest["sgx"]["debug"] is False
    hashed = {f["uri"]: f["sha256"] for f in manifest["sgx"]["trusted_files"] if isinstance(f, dict)}
    flow_file = Path(inputs.workdir) / "score_flow.py"
    assert hashed[f"file:{flow_file}"] == hashlib.sha256(flow_file.read_bytes()).hexdigest()
    assert len(hashed) == 2 and f"file:{PYTHON}" in manifest["sgx"]["trusted_files"]
    assert manifest["sgx"]["allowed_files"] == [f"file:{inputs.evidence}/", f"file:{inputs.datastore}/"]
    mounts = {m["path"]: m for m in manifest["fs"]["mounts"]}
    assert mounts[inputs.workdir]["uri"] == f"file:{inputs.workdir}"
    assert manifest["fs"]["mounts"][0] == {"type": "tmpfs", "path": "/tmp"}  # first: a later one hides those below
    for library in inputs.interpreter_libraries:  # an interpreter built --enable-shared (this one is) needs it
        assert mounts[library]["uri"] == f"file:{library}" and f"file:{library}" in manifest["sgx"]["trusted_files"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (('sgx.enclave_size = "2G"', 'sgx.enclave_size = "3G"'), "enclave_size"),
        (("sys.stack.size", "loader.insecure__use_host_env = true\nsys.stack.size"), "loader.insecure__use_host_env"),
        (
            ('loader.env.METAFLOW_USER = "ana"', "loader.env.METAFLOW_USER = { passthrough = true }"),
            "loader.env.METAFLOW_USER",
        ),
        (("sgx.debug = false", "sgx.debug = true"), "sgx.debug"),
        (('sgx.remote_attestation = "dcap"', 'sgx.remote_attestation = "none"'), "sgx.remote_attestation"),
        (("loader.argv = [", "loader.not_argv = ["), "loader.argv"),
        (("fs.start_dir", "fs.start_dir = 1\nfs.start_dir"), "manifest"),
    ],
)
def test_an_unsafe_or_wrong_manifest_is_refused_naming_the_key(tmp_path: Path, change, field: str) -> None:
    text = render(_inputs(tmp_path))
    assert change[0] in text
    with pytest.raises(InvalidInput) as refused:
        check(text.replace(change[0], change[1], 1), "sgx")
    assert str(refused.value).startswith(f"{field}:"), str(refused.value)


#: What Jinja would run or read (``gramine-manifest`` renders its input as a template again, the host's
#: environment in reach): a value of the task's must reach the enclave as it is.
JINJA = "{{ env.HOME }}{% if true %}x{% endif %}{# note #}{{"


def test_a_value_that_looks_like_jinja_stays_a_value(tmp_path: Path) -> None:
    """A file name, a variable's value, an argument or a path holding Jinja's markup: the manifest holds none
    (its braces escaped in TOML), so ``gramine-manifest``'s second rendering leaves it as it is, and each
    value reads back exactly; a manifest with markup is refused, since ``check`` runs before that rendering."""
    import jinja2

    (tmp_path / "code" / JINJA).mkdir(parents=True)
    (tmp_path / "code" / JINJA / "f.py").write_text("X = 1\n")
    inputs = _inputs(tmp_path, env={"METAFLOW_USER": f"ana{JINJA}"}, argv=[PYTHON, JINJA], sys_path=[f"/x/{JINJA}"])
    text = render(inputs)
    second = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    assert second.from_string(text).render() == text
    manifest = check(text, "sgx")
    assert manifest["loader"]["env"]["METAFLOW_USER"] == f"ana{JINJA}" and manifest["loader"]["argv"][1] == JINJA
    assert {"path": f"/x/{JINJA}", "uri": f"file:/x/{JINJA}"} in manifest["fs"]["mounts"]
    hashed = [f["uri"] for f in manifest["sgx"]["trusted_files"] if isinstance(f, dict)]
    assert f"file:{tmp_path}/code/{JINJA}/f.py" in hashed
    with pytest.raises(InvalidInput, match=r"^manifest: holds '\{\{', which gramine-manifest would expand"):
        check(text.replace("sgx.debug = false", "sgx.debug = false\n# {{ env.HOME }}"), "sgx")


def test_direct_mode_may_omit_attestation_and_bad_inputs_are_refused(tmp_path: Path) -> None:
    check(render(_inputs(tmp_path, remote_attestation="none")), "direct")
    with pytest.raises(InvalidInput, match=r"^env\.1BAD: is not a variable name"):
        render(_inputs(tmp_path, env={"1BAD": "x"}))
    assert enclave_bytes("512M") == 512 * 2**20
    with pytest.raises(InvalidInput, match=r"^enclave_size: '4 GB' is not a power of two"):
        enclave_bytes("4 GB")


def test_the_runtime_keeps_one_signing_key_and_knows_its_mrsigner(tmp_path: Path) -> None:
    key = gramine.signing_key(tmp_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and gramine.signing_key(tmp_path) == key
    signer = gramine.mr_signer(key)
    assert len(bytes.fromhex(signer)) == 32 and gramine.mr_signer(key) == signer
    pem = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert pem.key_size == 3072 and pem.public_key().public_numbers().e == 3  # what SGX requires
    weak = tmp_path / "weak.pem"
    weak.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(StackError, match="is not an SGX signing key"):
        gramine.mr_signer(weak)


def test_without_gramine_the_fix_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ToolMissingError) as missing:
        gramine.runtimedir()
    assert (
        missing.value.message == "gramine-manifest is not installed" and "gramine.readthedocs.io" in missing.value.fix
    )


def test_a_python_program_runs_in_gramine_direct_under_the_tasks_manifest(tmp_path: Path, gramine_tools: None) -> None:
    inputs = _inputs(
        tmp_path,
        argv=[PYTHON, "-c", "import os, sys; print('inside', os.environ['METAFLOW_USER'], sys.argv[0])"],
        env={"METAFLOW_USER": f"ana{JINJA}"},  # (gramine-manifest renders Jinja: it must find none)
        sys_path=STDLIB,  # what the program imports; a task's manifest trusts its environment's too
        trusted_dirs=[f"{path}/" for path in STDLIB],
        runtimedir=gramine.runtimedir(),
        remote_attestation="none",
    )
    for folder in (inputs.evidence, inputs.datastore):
        Path(folder).mkdir(exist_ok=True)
    prepared = gramine.prepare(inputs, tmp_path, "direct", None)
    expanded = tomllib.loads((tmp_path / "task.manifest").read_text())
    assert all(isinstance(f, dict) and f.get("sha256") for f in expanded["sgx"]["trusted_files"])
    done = subprocess.run(
        gramine.command(prepared, "direct"), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The manifest's command and environment, as they were, and nothing of the host's.
    assert f"inside ana{JINJA} -c" in done.stdout
