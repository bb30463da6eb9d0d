"""A Metaflow task's Gramine manifest: rendered from ``gramine/metaflow-task.manifest.template`` and checked
before Gramine ever sees it.

The runtime fills the template (Jinja2, every variable required, every
string TOML-escaped): the interpreter, the task's command and environment,
the code package's files with the SHA-256 the runtime computed, the folders
the task exchanges evidence through and writes its (sealed) values to, and
the enclave's size and threads from the decorator. ``check`` then parses
the result with ``tomllib`` and holds it to what a production enclave must
be (the rules below), so a mistake is one line naming the key. Gramine's
own ``gramine-manifest`` checks its schema and hashes the directories;
``gramine-sgx-sign`` measures the enclave.
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from metaflow_stack import catalog
from metaflow_stack.errors import InvalidInput

#: Sizes an enclave may have: a power of two, in Gramine's units.
_SIZE = re.compile(r"^(\d+)([KMG])$")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}
#: The one variable the host passes into a task's enclave: which task it is (its order, the quote binds).
HOST_CHOSEN = "METAFLOW_STACK_CONFIDENTIAL_TASK"
#: Environment variable names Gramine accepts (and a shell would).
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: What Jinja reads as the start of an expression, a statement or a comment.
_JINJA = re.compile(r"\{[{%#]")


class CodeFile(BaseModel):
    path: str
    sha256: str


class ManifestInputs(BaseModel):
    """What a task's manifest is made of (paths are absolute, as the enclave sees them)."""

    python: str
    argv: list[str] = Field(min_length=1)
    env: dict[str, str]
    workdir: str
    evidence: str
    datastore: str
    runtimedir: str
    #: The system's library folders (``library_dirs``): mounted, trusted, on ``LD_LIBRARY_PATH``.
    library_dirs: list[str] = Field(default_factory=lambda: library_dirs())
    #: The interpreter's own shared library, if it has one (``interpreter_libraries``): mounted, trusted, its
    #: folder on ``LD_LIBRARY_PATH``.
    interpreter_libraries: list[str] = Field(default_factory=lambda: interpreter_libraries())
    sys_path: list[str]
    trusted_dirs: list[str]
    code: list[CodeFile]
    enclave_size: str = "4G"
    max_threads: int = Field(32, ge=1, le=4096)
    remote_attestation: str = "dcap"
    isv_prod_id: int = Field(0, ge=0, le=0xFFFF)
    isv_svn: int = Field(0, ge=0, le=0xFFFF)


def library_dirs(arch_libdir: str = "/lib/x86_64-linux-gnu") -> list[str]:
    """The architecture's library folders, ``/lib/...`` and ``/usr/lib/...``, once each (on a merged-/usr
    system they are one folder, and hashing it twice would double the manifest's preparation)."""
    found: list[str] = []
    for folder in (arch_libdir, f"/usr{arch_libdir}"):
        if Path(folder).is_dir() and all(Path(folder).resolve() != Path(f).resolve() for f in found):
            found.append(folder)
    return found


def interpreter_libraries() -> list[str]:
    """``libpython3.x.so`` of an interpreter built with ``--enable-shared`` (the official Python images',
    setup-python's): an enclave sees only the files it is given, and such an interpreter does not start
    without it. The file alone, not its folder, which holds the whole standard library too."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return []
    library = Path(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
    return [str(library)] if library.is_file() else []


#: The template's file name, in the project's ``gramine/`` and in a step image's enclave folder.
TEMPLATE = "metaflow-task.manifest.template"


def template_path() -> Path:
    return catalog.project_root() / "gramine" / TEMPLATE


def _toml(value: Any) -> str:
    """A TOML basic string (JSON's escapes are TOML's), its braces escaped too (``\\u007B``, ``\\u007D``):
    ``gramine-manifest`` renders its input as a Jinja template again, with the host's environment in reach,
    so a ``{{ ... }}`` in a file name, a variable's value or a path would run on the host there, after
    ``check`` had passed the text."""
    return json.dumps(str(value), ensure_ascii=False).replace("{", "\\u007B").replace("}", "\\u007D")


def render(inputs: ManifestInputs, template: Path | None = None) -> str:
    """The manifest's TOML for ``inputs``; every variable the template names must be given."""
    import jinja2

    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    environment.filters["toml"] = _toml
    environment.filters["add_slash"] = lambda path: f"{path}/"
    environment.filters["parent"] = lambda path: str(Path(path).parent)
    source = (template or template_path()).read_text()
    for name in inputs.env:
        if not _ENV_NAME.match(name):
            raise InvalidInput(f"env.{name}", "is not a variable name Gramine takes")
    return environment.from_string(source).render(**inputs.model_dump())


def code_files(folder: Path) -> list[CodeFile]:
    """Every file of the unpacked code package under ``folder``, with its SHA-256 (trusted files)."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        found.append(CodeFile(path=str(path), sha256=digest.hexdigest()))
    return found


def enclave_bytes(size: str) -> int:
    """``"4G"`` as bytes; ``InvalidInput`` unless it is a power of two in K, M or G (as SGX requires)."""
    match = _SIZE.match(size)
    value = int(match[1]) * _UNITS[match[2]] if match else 0
    if not value or value & (value - 1):
        raise InvalidInput("enclave_size", f"{size!r} is not a power of two like 512M or 4G")
    return value


def _insecure_key(table: dict[str, Any], prefix: str = "") -> str | None:
    """The first key (dotted) that Gramine names ``insecure__``, anywhere in the manifest."""
    for key, value in table.items():
        if key.startswith("insecure__"):
            return prefix + key
        if isinstance(value, dict) and (found := _insecure_key(value, f"{prefix}{key}.")):
            return found
    return None


def check(text: str, mode: str) -> dict[str, Any]:
    """The manifest ``text`` parsed, held to what a task's enclave must be in ``mode`` (``sgx`` or ``direct``):
    the task's own command and no host arguments or environment, no insecure or debug setting, a
    power-of-two size, DCAP attestation for SGX, and every code file trusted with its hash."""
    if markup := _JINJA.search(text):
        raise InvalidInput(
            "manifest", f"holds {markup[0]!r}, which gramine-manifest would expand as Jinja after this check"
        )
    try:
        manifest = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput("manifest", f"is not TOML ({exc})") from None
    insecure = _insecure_key(manifest)
    if insecure:
        raise InvalidInput(insecure, "turns a protection off", fix="a task's enclave keeps every protection")
    loader, sgx, fs = manifest.get("loader", {}), manifest.get("sgx", {}), manifest.get("fs", {})
    for name, value in loader.get("env", {}).items():
        if name == HOST_CHOSEN and value == {"passthrough": True}:
            continue
        if not isinstance(value, str):  # {passthrough = true}: the host would choose the value
            raise InvalidInput(f"loader.env.{name}", "must be a value fixed in the manifest, not the host's")
    if not isinstance(loader.get("argv"), list) or not loader["argv"]:
        raise InvalidInput("loader.argv", "is missing: the task's command must be fixed in the manifest")
    if not str(manifest.get("libos", {}).get("entrypoint", "")).startswith("/"):
        raise InvalidInput("libos.entrypoint", "must be an absolute path")
    if not fs.get("mounts"):
        raise InvalidInput("fs.mounts", "is missing")
    enclave_bytes(str(sgx.get("enclave_size", "")))
    if sgx.get("debug") is not False:
        raise InvalidInput("sgx.debug", "must be false")
    wanted = "dcap" if mode == "sgx" else ("none", "dcap")
    if sgx.get("remote_attestation") not in (wanted if isinstance(wanted, tuple) else (wanted,)):
        raise InvalidInput("sgx.remote_attestation", f"must be dcap in {mode} mode")
    hashed = [f for f in sgx.get("trusted_files", []) if isinstance(f, dict)]
    for entry in hashed:
        if not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", ""))):
            raise InvalidInput("sgx.trusted_files", f"{entry.get('uri')} has no SHA-256")
    if not hashed:
        raise InvalidInput("sgx.trusted_files", "holds none of the task's code")
    return manifest
