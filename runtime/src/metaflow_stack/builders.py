"""Run one BuildKit build, by whichever route this machine's Docker offers.

BuildKit is required: Dockerfiles mount the CA bundle as a build secret
(``RUN --mount=type=secret,id=pipca``), so it never lands in a layer. Two
routes reach BuildKit:

* the buildx plugin (Docker Desktop, CI runners): ``docker buildx build``;
* a classic client whose ``docker build`` talks to the engine's built-in
  BuildKit when ``DOCKER_BUILDKIT=1`` (Docker 20.10 to 22.x, Debian's
  ``docker.io``).

Both run the client here rather than through python-on-whales, which puts
every build arg's value in the client's ``argv`` (and cannot pass
``--secret`` to a classic build).

Either way the image is tagged only after the whole build succeeded, so a
failed build leaves no half-tagged image behind.

A build arg can hold a credential (a devcontainer.json's
``${localEnv:PIP_INDEX_URL}``), so nothing a build prints or raises shows one:
not its command line; a ``--build-arg`` some tool logged, by its name alone;
the values of ``BuildRequest.private_args`` (any of 4 characters or more)
nowhere (``redact``). Nor does the client's own command line, which every
local user can read (``ps``, ``/proc/<pid>/cmdline``) while the build runs: a
private arg is passed by its name alone, its value in the client's
environment, where docker reads it. What no route can hide is BuildKit's own
record: an arg a ``RUN`` step uses is kept, in plain text, in the image's
history (``docker history``), so a credential belongs in a build secret
(``secrets``), never in an arg.

A build that publishes (``push``) goes to the registry its tag names. Through
buildx it is one manifest list for every platform asked for, with an SBOM and
full provenance attached; the classic route makes this machine's platform
only, and refuses a request for others rather than publish fewer than asked.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from python_on_whales.exceptions import DockerException
from rich.console import Console

from metaflow_stack import settings
from metaflow_stack.engines.docker import client
from metaflow_stack.errors import ImageBuildError, RegistryError, StackError, ToolMissingError

#: The build secret id Dockerfiles mount the CA bundle under.
CA_SECRET_ID = "pipca"

_TAIL_LINES = 25
_STEP = re.compile(r"^#(\d+) \[([^\]]+)\] (.*)$")
_STEP_ERROR = re.compile(r"^#(\d+) ERROR")
_PUSHED = re.compile(r"digest: (sha256:[0-9a-f]{64}) size: \d+")
#: A build step's output line (``#12 0.512 ...``) in which the runtime said what is wrong, or its fix.
_SAID = re.compile(r"^#(\d+) \d+(?:\.\d+)? (error|fix): (.+)$")
#: ``--build-arg NAME=value`` (or ``--build-arg=NAME=value``) in a command line some tool logged.
_BUILD_ARG = re.compile(r"(--build-arg[= ]+[\"']?[^\s=\"']+=)(?:\"[^\"]*\"|'[^']*'|\S*)")
#: Private values shorter than this are shown: no credential is so short, and a flag or a digit hidden
#: wherever it occurs would blot out the log.
_SHORTEST_HIDDEN = 4


def redact(text: str, private: Iterable[str] = ()) -> str:
    """``text`` with each ``--build-arg``'s value, and each of the ``private`` values anywhere, as ``***``."""
    text = _BUILD_ARG.sub(r"\1***", text)
    for value in sorted({v for v in private if len(v) >= _SHORTEST_HIDDEN}, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


@dataclass
class BuildRequest:
    """One image build: its staged context, the tag to give it, and its inputs."""

    context: Path
    tag: str
    build_args: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    dockerfile: str = "Dockerfile"
    #: The stage to build, for a Dockerfile that makes several images.
    target: str | None = None
    #: Push to the registry ``tag`` names instead of keeping the image here.
    push: bool = False
    #: The platforms to build for (``linux/amd64``, ...); none: this machine's.
    platforms: tuple[str, ...] = ()
    #: More build secrets, id -> file (an enclave's signing key): mounted by the steps that name them,
    #: never in a layer.
    secrets: dict[str, Path] = field(default_factory=dict)
    #: The ``build_args`` that may hold a credential (a user's): their values are shown nowhere (``redact``).
    private_args: tuple[str, ...] = ()

    def secret_values(self) -> list[str]:
        """The ``--secret`` values: the CA bundle, when the environment names one, and ``secrets``."""
        bundle = settings.load().ca_bundle
        found = [f"id={CA_SECRET_ID},src={bundle}"] if bundle else []
        return found + [f"id={name},src={path}" for name, path in self.secrets.items()]


class _StepTracker:
    """Follows BuildKit's plain progress output to name the step that failed."""

    def __init__(self, on_step: Callable[[str], None], private: Iterable[str] = ()) -> None:
        self._titles: dict[str, str] = {}
        self._on_step = on_step
        self._private = tuple(private)
        self.failed: str | None = None
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.failed_number: str | None = None
        #: What each step said in the runtime's one-line form (``error:``, ``fix:``), by step number.
        self.said: dict[str, dict[str, str]] = {}

    def feed(self, line: str) -> None:
        line = redact(line, self._private)
        self.tail.append(line)
        if match := _SAID.match(line):
            self.said.setdefault(match.group(1), {})[match.group(2)] = match.group(3)
        elif match := _STEP.match(line):
            number, where, title = match.groups()
            if number not in self._titles:
                self._titles[number] = f"[{where}] {title}"
                self._on_step(self._titles[number])
        elif match := _STEP_ERROR.match(line):
            self.failed = self._titles.get(match.group(1), line)
            self.failed_number = match.group(1)

    def error(self, image: str, fallback: str) -> ImageBuildError:
        fallback = redact(fallback, self._private)
        last = next(reversed(self._titles.values()), fallback) if self._titles else fallback
        lines = self.said.get(self.failed_number or "", {})
        said = (lines["error"], lines["fix"]) if {"error", "fix"} <= set(lines) else None
        return ImageBuildError(image, self.failed or last, "\n".join(self.tail), said)


@functools.cache
def _classic_buildkit_client(configured: str) -> str | None:
    """A ``docker`` client on PATH whose ``build`` reaches the engine's BuildKit."""
    candidates = [configured] if configured else _docker_binaries()
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    for binary in candidates:
        try:
            help_text = subprocess.run(
                [binary, "build", "--help"], env=env, capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "--secret" in help_text:
            return binary
    return None


def _docker_binaries() -> list[str]:
    """Every distinct ``docker`` executable on PATH, in PATH order."""
    found: list[str] = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("docker", path=directory)
        if candidate and os.path.realpath(candidate) not in map(os.path.realpath, found):
            found.append(candidate)
    return found


def route() -> str:
    """``buildx`` or ``classic:<client>``: how builds reach BuildKit here."""
    if client().buildx.is_installed():
        return "buildx"
    classic = _classic_buildkit_client(settings.load().docker_client)
    if classic:
        return f"classic:{classic}"
    raise ToolMissingError(
        "no route to BuildKit: the docker client has no buildx plugin and no classic client supports BuildKit",
        fix="install the buildx plugin (package docker-buildx-plugin or docker-buildx), "
        "or set METAFLOW_STACK_DOCKER_CLIENT to a docker client of version 20.10 to 22.x",
    )


def build(request: BuildRequest, console: Console) -> str | None:
    """Build and tag ``request.tag``, printing each build step as it starts; the pushed digest when it pushes."""
    private = [request.build_args[name] for name in request.private_args if name in request.build_args]
    tracker = _StepTracker(
        lambda step: console.print(f"  {step}", markup=False, highlight=False, soft_wrap=True), private
    )
    how = route()
    if how != "buildx" and request.platforms:
        raise ToolMissingError(
            f"building {request.tag} for {', '.join(request.platforms)} needs the buildx plugin",
            fix="install the buildx plugin, or build for this machine's platform only (no --platform)",
        )
    try:
        if how == "buildx":
            return _build_buildx(request, tracker)
        _build_classic(request, tracker, how.split(":", 1)[1])
    except DockerException as exc:  # (not its text: the whole command line, build args and all)
        said = (exc.stderr or "").strip().splitlines()
        raise tracker.error(
            request.tag, fallback=said[-1] if said else f"docker exited with {exc.return_code}"
        ) from None
    except subprocess.CalledProcessError as exc:  # (its output, the reason, is in the tail already)
        raise tracker.error(request.tag, fallback=f"the start (docker build exited with {exc.returncode})") from None
    return _push_classic(request.tag) if request.push else None


#: Variables the docker client reads for itself: a private arg of such a name would change how it runs.
_CLIENTS_OWN = re.compile(r"(DOCKER|BUILDX|BUILDKIT|LD|XDG|SSL_CERT)_\w*|HOME|PATH|TMPDIR", re.IGNORECASE)


def _common_flags(request: BuildRequest) -> tuple[list[str], dict[str, str]]:
    """The flags both routes pass, and the environment the client runs in.

    A private arg goes as ``--build-arg NAME``, which docker completes from
    its own environment: its value is never in the client's ``argv``, which
    any local user can read while the build runs.
    """
    flags = ["--file", str(request.context / request.dockerfile)]
    if request.target:
        flags += ["--target", request.target]
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    for key, value in request.build_args.items():
        if key in request.private_args:
            if _CLIENTS_OWN.fullmatch(key):
                raise StackError(
                    f"the build arg {key} would also set the docker client's own {key} (a private arg reaches the "
                    "build through the client's environment)",
                    fix=f"rename the arg {key} in the Dockerfile and the devcontainer.json",
                )
            flags += ["--build-arg", key]
            env[key] = value
        else:
            flags += ["--build-arg", f"{key}={value}"]
    for key, value in request.labels.items():
        flags += ["--label", f"{key}={value}"]
    for secret in request.secret_values():
        flags += ["--secret", secret]
    return flags, env


def _run(command: list[str], env: dict[str, str], tracker: _StepTracker) -> None:
    """Run a build client, its output (both streams) fed to ``tracker``; ``CalledProcessError`` when it fails."""
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tracker.feed(line.rstrip("\n"))
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)


def _attestations(request: BuildRequest) -> bool:
    """Whether this push can carry SBOM and provenance: the builder's driver keeps them (BuildKit in the
    engine, buildx's ``docker`` driver, refuses attestations and several platforms)."""
    if not request.push:
        return False
    if client().buildx.inspect().driver != "docker":
        return True
    if len(request.platforms) > 1:
        raise ToolMissingError(
            f"building {request.tag} for {', '.join(request.platforms)} needs a buildx builder that is not "
            "the engine's own",
            fix="docker buildx create --use --driver docker-container",
        )
    return False


#: The buildx drivers whose BuildKit runs on this machine's engine: the only ones ``secrets`` go to.
_LOCAL_DRIVERS = ("docker", "docker-container")


def _build_buildx(request: BuildRequest, tracker: _StepTracker) -> str | None:
    if request.secrets and (driver := client().buildx.inspect().driver) not in _LOCAL_DRIVERS:
        raise StackError(
            f"{request.tag} is built with {', '.join(request.secrets)}, which a {driver} builder would receive on "
            "another machine",
            fix="docker buildx use default (the engine's own builder)",
        )
    attest = _attestations(request)
    flags, env = _common_flags(request)
    with tempfile.TemporaryDirectory(prefix="stack-build-") as tmp:
        metadata = Path(tmp) / "metadata.json"
        command = [*client().client_config.docker_cmd, "buildx", "build", "--progress=plain", *flags]
        command += ["--tag", request.tag, "--metadata-file", str(metadata), "--push" if request.push else "--load"]
        if request.platforms:
            command += ["--platform", ",".join(request.platforms)]
        if attest:
            command += ["--sbom=true", "--provenance=mode=max"]
        _run([*command, str(request.context)], env, tracker)
        if not request.push:
            return None
        try:
            return json.loads(metadata.read_text())["containerimage.digest"]
        except (OSError, ValueError, KeyError) as exc:
            raise tracker.error(request.tag, fallback=f"reading the pushed digest: {exc}") from None


def _push_classic(tag: str) -> str:
    """Push ``tag`` through the engine; the digest the registry stored it under (the engine's answer)."""
    try:
        answer = client().image.push(tag, stream_logs=True) or []
        said = b"".join(chunk for _, chunk in answer).decode(errors="replace")
    except DockerException as exc:
        raise RegistryError(
            f"pushing {tag} failed: {(exc.stderr or str(exc)).strip()}",
            fix="check that the registry answers (`metaflow stack doctor`) and that you are logged in to it",
        ) from None
    # The engine's last word on a push: "<tag>: digest: sha256:<hex> size: <n>".
    pushed = _PUSHED.findall(said)
    if not pushed:
        raise RegistryError(f"the engine pushed {tag} without naming its digest", fix="push it again")
    return str(pushed[-1])


def _build_classic(request: BuildRequest, tracker: _StepTracker, binary: str) -> None:
    flags, env = _common_flags(request)
    with tempfile.TemporaryDirectory(prefix="stack-build-") as tmp:
        iidfile = Path(tmp) / "iid"
        _run(
            [binary, "build", "--progress=plain", "--iidfile", str(iidfile), *flags, str(request.context)], env, tracker
        )
        client().image.tag(iidfile.read_text().strip(), request.tag)
