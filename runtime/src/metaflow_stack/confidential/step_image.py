"""A Gramine ``@confidential`` step's own image, GSC-style (``container=True``), and its tasks run in it.

The step's image builds FROM the stack's ``gramine`` image (or
``METAFLOW_STACK_GRAMINE_IMAGE``) with ``gramine/Dockerfile``: the unpacked
code package is copied in, and the enclave is prepared inside the image at
build time by ``enclave_build``. That renders the manifest for the image's
own interpreter and paths, has ``gramine-manifest`` hash every trusted file,
and for SGX signs it with the runtime's enclave key, mounted as a BuildKit
secret so it never lands in a layer. The MRENCLAVE is read back from the
built image and recorded in each task's metadata.

The tag hashes the staged context (the code, the enclave's settings, the
manifest template, the Dockerfile) and the image below it, so every task
and every run with the same code and settings reuses one image.

A task runs as a container of the image, as the user running the flow (so
it reads its order and writes to the datastore that user owns): the
enclave's evidence folder is a folder of this machine mounted where the
manifest expects it, the local datastore at its own path, and for SGX the
enclave device and the AESM socket the quote comes through.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console

from metaflow_stack import builders, catalog, images, settings
from metaflow_stack.confidential import gramine
from metaflow_stack.confidential.inside import EXCHANGE
from metaflow_stack.confidential.launcher import Settings, Started, enclave_env
from metaflow_stack.confidential.manifest import TEMPLATE, template_path
from metaflow_stack.elsewhere import Launcher
from metaflow_stack.elsewhere import remove_orphans as elsewhere_orphans
from metaflow_stack.engines import JobSpec, Mount, get_engine, host_user
from metaflow_stack.engines.docker import DockerEngine, DockerJob, require_engine

#: Where the enclave lives in the image: its code, its prepared manifest, and its evidence folder.
ENCLAVE = "/opt/enclave"
CODE = f"{ENCLAVE}/code"
EVIDENCE = f"{ENCLAVE}/evidence"
#: The build secret the enclave signing key is mounted as (``RUN --mount=type=secret,id=enclave-key``).
KEY_SECRET = "enclave-key"
#: The staged enclave settings ``enclave_build`` reads, and what it leaves for the launcher.
SPEC, READY = "enclave.json", "ready.json"
#: Labels every task container carries: its exchange, and the launcher waiting on it (``elsewhere.Launcher``).
LABEL = "io.metaflow-stack.confidential"
OWNER = "io.metaflow-stack.confidential.owner"
#: What SGX needs of the host: the enclave device, and the AESM service's socket for DCAP quotes.
SGX_DEVICES = ("/dev/sgx_enclave", "/dev/sgx_provision")
AESM_SOCKET = "/var/run/aesmd"


class StepEnclave(BaseModel):
    """What the launcher stages for ``enclave_build``: the enclave's settings and its fixed environment."""

    mode: str
    enclave_size: str
    threads: int
    isv_prod_id: int
    isv_svn: int
    env: dict[str, str]
    datastore: str
    #: The signer of an SGX enclave (public): a new key makes a new image.
    mr_signer: str | None


@dataclass(frozen=True)
class StepImage:
    """A step's built image, the MRENCLAVE its manifest was signed with (SGX only), and the folder of this
    machine its tasks' containers exchange evidence through."""

    reference: str
    mr_enclave: str | None
    evidence: Path


def gramine_image(console: Console) -> str:
    """The image step images build FROM: ``METAFLOW_STACK_GRAMINE_IMAGE``, else the catalog's ``gramine``."""
    return settings.load().gramine_image or images.resolve("gramine", console=console)


def build(
    code: Path,
    datastore: str,
    chosen: Settings,
    state_dir: Path,
    code_env: dict[str, str],
    keeper_key: str,
    console: Console | None = None,
) -> StepImage:
    """The step's image for the unpacked ``code`` (built once per code and settings), and its MRENCLAVE."""
    console = console or Console(stderr=True)
    docker = require_engine()
    below = gramine_image(console)
    key = gramine.signing_key(state_dir) if chosen.mode == "sgx" else None
    spec = StepEnclave(
        mode=chosen.mode, enclave_size=chosen.enclave_size, threads=chosen.threads, isv_prod_id=chosen.isv_prod_id,
        isv_svn=chosen.isv_svn, env=enclave_env(CODE, chosen, code_env, keeper_key), datastore=datastore,
        mr_signer=gramine.mr_signer(key) if key else None,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="stack-enclave-image-") as tmp:
        context = Path(tmp)
        shutil.copytree(code, context / "code", symlinks=False)
        shutil.copy(catalog.project_root() / "gramine" / "Dockerfile", context / "Dockerfile")
        shutil.copy(template_path(), context / TEMPLATE)
        (context / SPEC).write_text(spec.model_dump_json(indent=1))
        for path in [context, *context.rglob("*")]:  # the enclave's user reads everything; staging is private
            path.chmod(0o755 if path.is_dir() else 0o644)
        tag = catalog.tag_for(context, below)
        reference = f"{settings.load().image_namespace}/confidential-step:{tag}"
        kept = state_dir / "confidential" / "step-images" / tag
        kept.mkdir(parents=True, exist_ok=True)
        with (kept.parent / f"{tag}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the step's other tasks wait, then find it built
            if docker.image.exists(reference):
                console.print(f"{reference} is up to date")
            else:
                request = builders.BuildRequest(
                    context=context,
                    tag=reference,
                    build_args={"GRAMINE_IMAGE": below},
                    labels={"io.metaflow-stack.confidential.mode": chosen.mode},
                    secrets={KEY_SECRET: key} if key else {},
                )
                with console.status(f"building {reference}"):
                    builders.build(request, console)
                console.print(f"built {reference}")
            ready = kept / READY
            if not ready.is_file():  # read from the image once, not by every task
                ready.write_text(docker.run(reference, ["cat", f"{ENCLAVE}/{READY}"], remove=True, user=host_user()))
    (kept / "evidence").mkdir(exist_ok=True)
    return StepImage(reference, json.loads(ready.read_text())["mr_enclave"], kept / "evidence")


class _Container:
    """A task's enclave as a container, its output relayed line by line as the task writes it."""

    def __init__(self, spec: JobSpec) -> None:
        self.job: DockerJob = get_engine("docker", probe=False).launch(spec)  # type: ignore[assignment]
        self.relay = threading.Thread(target=self._relay, daemon=True)
        self.relay.start()

    def _relay(self) -> None:
        for stream, line in self.job.streams(follow=True):
            print(line, file=sys.stderr if stream == "stderr" else sys.stdout, flush=True)

    def poll(self) -> int | None:
        """Asked every 50 ms: the engine only once the output ended (the container stopped, or its log
        stream broke), not a ``docker inspect`` each time."""
        if self.relay.is_alive():
            return None
        return self.job.exit_code

    def stop(self) -> None:
        self.job.kill()
        self.relay.join(timeout=10)


def in_container(image: StepImage, mode: str, datastore: str) -> Callable[[str], Started]:
    """How a task is started as a container of the step's ``image``, given its exchange's name (a folder
    under ``image.evidence``, mounted as the enclave's evidence folder)."""
    mounts = [Mount(str(image.evidence), EVIDENCE, read_only=False), Mount(datastore, datastore, read_only=False)]
    devices: tuple[str, ...] = ()
    if mode == "sgx":
        devices = tuple(d for d in SGX_DEVICES if Path(d).exists())
        if Path(AESM_SOCKET).is_dir():
            mounts.append(Mount(AESM_SOCKET, AESM_SOCKET, read_only=False))
    command = gramine.command(gramine.Prepared(Path(ENCLAVE), "task", image.mr_enclave), mode, here=False)

    def start(exchange: str) -> Started:
        labels = {LABEL: exchange, OWNER: Launcher.this().label}
        spec = JobSpec(
            image=image.reference, command=command, env={EXCHANGE: exchange}, mounts=mounts, workdir=ENCLAVE,
            user=host_user(), owner="confidential", devices=devices, labels=labels,
        )  # fmt: skip
        return _Container(spec)

    return start


def remove_orphans() -> int:
    """Remove task containers whose launcher on this host was killed outright; how many."""
    return elsewhere_orphans(DockerEngine(), LABEL, OWNER)
