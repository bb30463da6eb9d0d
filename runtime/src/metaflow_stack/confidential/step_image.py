"""A Gramine ``@confidential`` step's own image, GSC-style (``container=True``), and its tasks run in it.

The step's image builds FROM the stack's ``gramine`` image (or
``METAFLOW_STACK_GRAMINE_IMAGE``) with ``gramine/Dockerfile``: the step's
``@pypi`` environment as Metaflow solved it (``solved_environment``: the
wheel files it downloaded for the run) is installed in a layer of its own,
the unpacked code package is copied in, and the enclave is prepared inside
the image at build time by ``enclave_build``. That renders the manifest for
the image's own interpreter and paths, has ``gramine-manifest`` hash every
trusted file, and for SGX signs it with the runtime's enclave key, mounted
as a BuildKit secret so it never lands in a layer. The MRENCLAVE is read
back from the built image and recorded in each task's metadata.

The tag hashes the staged context (the code, the enclave's settings and
environment, the manifest template, the Dockerfile), the wheels by name,
size and time, and the image below it, by its content, so every task and
every run with the same code, environment and settings reuses one image.

A task runs as a container of the image, as the user running the flow (so
it reads its order and writes to the datastore that user owns): its exchange
folder, a folder of this machine, mounted where the manifest expects
exchanges, the local datastore at its own path, and for SGX the enclave
device (with its group) and the AESM socket the quote comes through.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from python_on_whales.exceptions import DockerException
from rich.console import Console

from metaflow_stack import builders, catalog, images, settings
from metaflow_stack.confidential import gramine, seccomp
from metaflow_stack.confidential.inside import EXCHANGE
from metaflow_stack.confidential.launcher import Settings, Started, enclave_env
from metaflow_stack.confidential.manifest import TEMPLATE, template_path
from metaflow_stack.confidential.step_enclave import (
    CODE,
    ENCLAVE,
    ENVIRONMENT,
    EXCHANGES,
    KEY_SECRET,
    PACKAGES,
    READY,
    SPEC,
    WHEELS,
    StepEnclave,
    StepEnvironment,
)
from metaflow_stack.elsewhere import Launcher
from metaflow_stack.elsewhere import remove_orphans as elsewhere_orphans
from metaflow_stack.engines import JobSpec, Mount, flow_mounts, host_user
from metaflow_stack.engines.docker import DockerEngine, require_engine
from metaflow_stack.errors import StackError
from metaflow_stack.solved_environment import SolvedEnvironment

#: Labels every task container carries: its exchange, and the launcher waiting on it (``elsewhere.Launcher``).
LABEL = "io.metaflow-stack.confidential"
OWNER = "io.metaflow-stack.confidential.owner"
#: What SGX needs of the host: the enclave device (quotes go through AESM, so not ``/dev/sgx_provision``),
#: and the AESM service's socket folder.
SGX_DEVICE = "/dev/sgx_enclave"
AESM_SOCKET = "/var/run/aesmd"
#: Removes a task's container once the launcher that started it is gone, however it went (SIGKILL, the OOM
#: killer), so an enclave whose attempt already failed does not run on; a reboot is the sweep's.
_WATCHDOG = """import os, sys, time
while os.getppid() == int(sys.argv[2]):  # the launcher's pid, given: it may be gone before this line runs
    time.sleep(1)
from metaflow_stack.engines.docker import DockerJob, client
DockerJob(client(), sys.argv[1]).kill()
"""


@dataclass(frozen=True)
class StepImage:
    """A step's built image, its enclave's manifest stem and MRENCLAVE (SGX only), and the folder of this
    machine its tasks' exchange folders are made in."""

    reference: str
    stem: str
    mr_enclave: str | None
    exchanges: Path


@contextmanager
def _one_at_a_time(lock: Path) -> Iterator[None]:
    """One process at a time here (a foreach's tasks all start together); the others wait, then find the
    work done."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


def gramine_image() -> str:
    """The image step images build FROM, resolved once per run (``@confidential``'s ``runtime_init``):
    ``METAFLOW_STACK_GRAMINE_IMAGE`` (here, or pulled), else the catalog's ``gramine`` (found, pulled or
    built; one run at a time)."""
    docker, configured = require_engine(), settings.load().gramine_image
    if configured:
        if not docker.image.exists(configured):
            try:
                docker.image.pull(configured, quiet=True)
            except DockerException:
                raise StackError(
                    f"METAFLOW_STACK_GRAMINE_IMAGE names {configured}, which is not here and cannot be pulled",
                    fix="pull or build it, or unset METAFLOW_STACK_GRAMINE_IMAGE for the stack's gramine image",
                ) from None
        return configured
    with _one_at_a_time(settings.load().state_dir / "confidential" / "step-images" / "gramine.lock"):
        return images.resolve("gramine", console=Console(stderr=True))


def build(
    code: Path,
    datastore: str,
    chosen: Settings,
    state_dir: Path,
    code_env: dict[str, str],
    keeper_key: str,
    below: str,
    environment: SolvedEnvironment | None = None,
) -> StepImage:
    """The step's image FROM ``below`` for the unpacked ``code`` with the step's ``environment`` installed
    (built once per code, environment and settings), and its MRENCLAVE. A task whose image is built finds it
    by what it is made of, without staging anything."""
    console = Console(stderr=True)
    docker = require_engine()
    key = gramine.signing_key(state_dir) if chosen.mode == "sgx" else None
    env = enclave_env(CODE, chosen, code_env, keeper_key)
    wheels = list(environment.wheels) if environment is not None else []
    packages = StepEnvironment(python=environment.python if wheels else None, wheels=[w.name for w in wheels])
    if wheels:
        env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{PACKAGES}"  # after the code, before the runtime's packages
    spec = StepEnclave(
        mode=chosen.mode, enclave_size=chosen.enclave_size, threads=chosen.threads, isv_prod_id=chosen.isv_prod_id,
        isv_svn=chosen.isv_svn, env=env, datastore=datastore, mr_signer=gramine.mr_signer(key) if key else None,
    )  # fmt: skip
    dockerfile = catalog.project_root() / "gramine" / "Dockerfile"
    staged = {SPEC: spec.model_dump_json(indent=1), ENVIRONMENT: packages.model_dump_json(indent=1),
              "Dockerfile": dockerfile.read_text(), TEMPLATE: template_path().read_text()}  # fmt: skip
    # The code by its files (read, not copied); the image below by its content (a name like ``:latest`` may
    # name another image tomorrow); the wheels by name, size and time: a large environment is not read.
    made_of = json.dumps([staged, docker.image.inspect(below).id, _identity(wheels)], sort_keys=True)
    tag = catalog.tag_for(code, f"{below} {hashlib.sha256(made_of.encode()).hexdigest()}")
    reference = f"{settings.load().image_namespace}/confidential-step:{tag}"
    kept = state_dir / "confidential" / "step-images" / tag
    ready = kept / READY
    with _one_at_a_time(kept.with_suffix(".lock")):
        if docker.image.exists(reference):
            console.print(f"{reference} is up to date")
        else:
            with tempfile.TemporaryDirectory(prefix="stack-enclave-image-") as tmp:
                _build(Path(tmp), code, staged, wheels, builders.BuildRequest(
                    context=Path(tmp), tag=reference, build_args={"GRAMINE_IMAGE": below},
                    labels={"io.metaflow-stack.confidential.mode": chosen.mode},
                    secrets={KEY_SECRET: key} if key else {},
                ), console)  # fmt: skip
            ready.unlink(missing_ok=True)
        if not ready.is_file():  # read from the image once, not by every task; whole, or not there
            kept.mkdir(parents=True, exist_ok=True)
            read = docker.run(reference, ["cat", f"{ENCLAVE}/{READY}"], remove=True, user=host_user())
            partial = ready.with_suffix(".partial")
            partial.write_text(read)
            os.replace(partial, ready)
        found = json.loads(ready.read_text())
        (kept / "exchanges").mkdir(exist_ok=True)
        seccomp.write(kept)
    return StepImage(reference, found["stem"], found["mr_enclave"], kept / "exchanges")


def _build(
    context: Path, code: Path, staged: dict[str, str], wheels: list[Path], request: builders.BuildRequest,
    console: Console,
) -> None:  # fmt: skip
    """Stage the context (the code, ``staged``'s files, the wheels Metaflow downloaded or built for the run:
    the build downloads none) and build ``request``."""
    # A link as a link, as the tag hashes it (by its target's name) and as Metaflow unpacks a code package.
    shutil.copytree(code, context / "code", symlinks=True)
    for name, text in staged.items():
        (context / name).write_text(text)
    (context / WHEELS).mkdir()
    catalog.normalise_modes(context)  # copied into the image as they are: its users read everything
    for wheel in wheels:
        _stage(wheel, context / WHEELS / wheel.name)
    with console.status(f"building {request.tag}"):
        builders.build(request, console)
    console.print(f"built {request.tag}")


def _identity(wheels: list[Path]) -> str:
    """The wheels as Metaflow keeps them (an index's file never changes under its name; a built one is kept
    under its source's hash): their names, sizes and modification times."""
    found = [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in wheels]
    return hashlib.sha256(json.dumps(found).encode()).hexdigest()


def _stage(wheel: Path, staged: Path) -> None:
    """``wheel`` in the build's context: linked where it is on the same file system, else copied; readable."""
    try:
        os.link(wheel, staged)
    except OSError:
        shutil.copyfile(wheel, staged)
        staged.chmod(0o644)


class _Container:
    """A task's enclave as a container, its output relayed line by line as the task writes it, and a
    watchdog that removes it (by its name, so from before it exists) if the launcher dies without doing so."""

    def __init__(self, spec: JobSpec) -> None:
        self.watchdog = subprocess.Popen(  # ``in_container`` names every task's container
            [sys.executable, "-c", _WATCHDOG, str(spec.name), str(os.getpid())], start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            self.job = DockerEngine(probe=False).launch(spec)
        except BaseException:
            self._end_watchdog()
            raise
        self.relay = threading.Thread(target=self._relay, daemon=True)
        self.relay.start()

    def _end_watchdog(self) -> None:
        self.watchdog.kill()
        self.watchdog.wait()

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
        self._end_watchdog()


def in_container(image: StepImage, mode: str, datastore: str, flow: str) -> Callable[[str], Started]:
    """How a task of ``flow`` is started as a container of the step's ``image``, given its exchange's name: a
    folder under ``image.exchanges``, mounted alone where the manifest expects exchanges; the datastore
    writable in the flow's own folder only (``flow_mounts``)."""
    mounts = flow_mounts(datastore, flow)
    devices: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    if mode == "sgx" and os.path.exists(SGX_DEVICE):
        devices, groups = (SGX_DEVICE,), (str(os.stat(SGX_DEVICE).st_gid),)
    if mode == "sgx" and os.path.isdir(AESM_SOCKET):
        mounts.append(Mount(AESM_SOCKET, AESM_SOCKET, read_only=False))
    command = gramine.command(gramine.Prepared(Path(ENCLAVE), image.stem, image.mr_enclave), mode, here=False)
    # gramine-direct's first call is one Docker's default profile refuses (seccomp.py says which, and why).
    profile = str(image.exchanges.parent / seccomp.FILE) if mode == "direct" else None

    def start(exchange: str) -> Started:
        spec = JobSpec(
            image=image.reference, command=command, env={EXCHANGE: exchange}, workdir=ENCLAVE, user=host_user(),
            name=f"confidential-{exchange}",
            mounts=[*mounts, Mount(str(image.exchanges / exchange), f"{EXCHANGES}/{exchange}", read_only=False)],
            owner="confidential", devices=devices, groups=groups, seccomp=profile,
            labels={LABEL: exchange, OWNER: Launcher.this().label},
        )  # fmt: skip
        return _Container(spec)

    return start


def remove_orphans() -> int:
    """Remove task containers whose launcher on this host is gone and whose watchdog could not (a reboot);
    how many."""
    return elsewhere_orphans(DockerEngine(), LABEL, OWNER)
