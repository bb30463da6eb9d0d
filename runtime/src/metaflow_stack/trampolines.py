"""What every compute decorator and its trampoline share (``devcontainer step``, ``nomad step``): the code
package saved once per run, the arguments and options Metaflow's runtime gives the trampoline, the real
step command rebuilt from them, as Metaflow's ``kubernetes step`` does, and signals turned into
``KeyboardInterrupt`` so a task stopped by the runtime cleans up where it runs."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, NoReturn

from metaflow_stack.errors import StackError

#: Long input paths travel in environment variables of this size, as Metaflow's own trampolines do.
INPUT_PATHS_CHUNK = 30 * 1024
#: The task's options Metaflow's runtime passes to a trampoline (``CLIArgs.default_args``).
STEP_OPTIONS = (
    ("--run-id", {}),
    ("--task-id", {}),
    ("--input-paths", {}),
    ("--split-index", {}),
    ("--clone-path", {}),
    ("--clone-run-id", {}),
    ("--tag", {"multiple": True, "default": None}),
    ("--namespace", {"default": None}),
    ("--retry-count", {"default": 0}),
    ("--max-user-code-retries", {"default": 0}),
    ("--ubf-context", {"default": None}),
)


def step_parameters(command: Callable[..., Any]) -> Callable[..., Any]:
    """A trampoline's click command with what the runtime gives every one: the step, the code package
    (metadata, sha, URL) as its first arguments, after them the task's options."""
    from metaflow._vendor import click

    for name, settings in reversed(STEP_OPTIONS):
        command = click.option(name, **settings)(command)
    for name in ("code-package-url", "code-package-sha", "code-package-metadata", "step-name"):
        command = click.argument(name)(command)
    return command


def save_package_once(decorator: type, flow_datastore: Any, package: Any) -> None:
    """Save the run's code package in its datastore once (the first task of the decorator's steps), noting
    where on the decorator's class."""
    if decorator.package_url is None:
        decorator.package_url, decorator.package_sha = flow_datastore.save_data([package.blob], len_hint=1)[0]
        decorator.package_metadata = package.package_metadata


class Trampolined:
    """The half of Metaflow's compute-decorator contract every such step decorator shares (mixed in before
    ``StepDecorator``; it sets ``flow_datastore`` and ``decos`` at ``step_init`` and calls ``take_over`` at
    ``runtime_init``): the code package saved once with the first task, and each task's command swapped for
    the trampoline's."""

    #: The step's decorators (``step_init``'s ``decos``).
    decos: Sequence[Any] = ()

    package_url: ClassVar[str | None] = None
    package_sha: ClassVar[str | None] = None
    package_metadata: ClassVar[str | None] = None

    def take_over(self, package: Any) -> None:
        """At ``runtime_init``: keep the run's code ``package``, and leave this step's tasks to the trampoline.

        Under ``--environment pypi|conda`` Metaflow's ``@conda`` runs a task under the step's environment's
        interpreter, with the code package first on its ``PYTHONPATH``, unless the step has a compute
        decorator it knows by name (``@kubernetes``...); and it looks that interpreter up on this machine,
        where an environment solved for another platform is not made. The trampoline needs this interpreter
        and this installation of the runtime (its images and templates are not in the code package), so this
        step's ``@conda`` is told to leave its tasks alone: its own ``disabled``, not the user's attribute,
        so the environment is still solved, and made where the task runs. Set here, after every decorator's
        ``step_init`` and before any task, it holds whatever the decorators' order.
        """
        self.package = package
        for deco in self.decos:
            if deco.name == "conda":
                deco.disabled = True

    def runtime_task_created(self, task_datastore, task_id, split_index, input_paths, is_cloned, ubf_context) -> None:
        if not is_cloned:
            save_package_once(type(self), self.flow_datastore, self.package)

    def trampoline(self, cli_args: Any, retry_count: int, max_user_code_retries: int, group: str) -> bool:
        """Make the task ``GROUP step STEP PACKAGE...`` under this interpreter; ``False`` (nothing changed)
        for a ``@catch`` fallback attempt, which runs no user code, locally, as with Metaflow's own compute
        decorators (under this interpreter too: see ``take_over``)."""
        if retry_count > max_user_code_retries:
            return False
        cls = type(self)
        cli_args.commands = [group, "step"]
        cli_args.command_args += [cls.package_metadata, cls.package_sha, cls.package_url]
        cli_args.entrypoint[0] = sys.executable
        return True


def step_command(ctx: Any, step_name: str, options: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """``FLOW TOP_OPTIONS step STEP OPTIONS`` (the flow file by its name: the code package's copy, where
    the step runs) from a trampoline's click context and its step ``options``, and the variables that
    carry input paths too long for a command line."""
    from metaflow import util

    options, env = dict(options), {}
    options.pop("ubf_context", None)
    if options.get("input_paths"):
        paths = options["input_paths"]
        chunks = {
            f"METAFLOW_INPUT_PATHS_{i // INPUT_PATHS_CHUNK}": paths[i : i + INPUT_PATHS_CHUNK]
            for i in range(0, len(paths), INPUT_PATHS_CHUNK)
        }
        env.update(chunks)
        options["input_paths"] = "".join(f"${{{name}}}" for name in chunks)
    command = "{flow} {top} step {step} {args}".format(
        flow=os.path.basename(sys.argv[0]),
        top=" ".join(util.dict_to_cli_options(ctx.parent.parent.params)),
        step=step_name,
        args=" ".join(util.dict_to_cli_options(options)),
    )
    return command, env


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """Turn SIGTERM into ``KeyboardInterrupt`` while a task runs elsewhere, so what it runs in is removed on
    the way out (only the main thread may set handlers: elsewhere the caller owns the signals). The run's
    runtime ending (SIGTERM from a supervisor, which reaches it alone; killed outright) sends this process
    SIGTERM too, so what it started elsewhere does not outlive the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous, told = signal.signal(signal.SIGTERM, interrupt), parent_death_signal()
    try:
        die_with_parent(signal.SIGTERM)
        yield
    finally:
        die_with_parent(told)
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def undone_if_killed(undo: Callable[[], None]) -> Iterator[None]:
    """While the block runs, a child of this process waits to run ``undo`` should this process be killed
    outright, which no handler here can see: Metaflow's runtime stops the tasks still running that way
    (SIGKILL, after five seconds) when another task fails the run. However the block ends, the child goes
    without running it (the caller's own cleanup, inside the block, does that). Linux only
    (``PR_SET_PDEATHSIG``), and only from a process with no thread but its own (it forks); elsewhere the
    next run's sweep does it."""
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _undo_when_orphaned(undo, parent)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _undo_when_orphaned(undo: Callable[[], None], parent: int) -> NoReturn:
    """In ``undone_if_killed``'s child: wait for the kernel's word that ``parent`` died, then ``undo``."""
    code = 1
    try:
        # Holding nothing of the parent's open (the runtime reads the task's end from its output's pipes
        # closing; ``undo`` opens what it needs).
        quiet = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(quiet, fd)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        gc.disable()  # (the parent's objects, their descriptors closed here, are never finalised here)
        for number in (signal.SIGINT, signal.SIGHUP):  # (the terminal's: Ctrl-C or its closing is the parent's)
            signal.signal(number, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # (held for sigwait, even one sent at once)
        die_with_parent(signal.SIGTERM)
        while os.getppid() == parent:  # (a SIGTERM from elsewhere while the parent lives: the parent's to answer)
            signal.sigwait({signal.SIGTERM})
        undo()
        code = 0
    finally:
        os._exit(code)


def parent_death_signal() -> int:
    """The signal the kernel sends this process when its parent dies (``PR_GET_PDEATHSIG``; 0: none)."""
    if not sys.platform.startswith("linux"):
        return 0
    number = ctypes.c_int(0)
    ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(number))  # PR_GET_PDEATHSIG
    return number.value


def die_with_parent(number: int = signal.SIGKILL) -> None:
    """On Linux, have the kernel send this process ``number`` when the one that started it dies
    (``PR_SET_PDEATHSIG``, kept across ``exec``; 0: no longer): SIGKILL so a pool or a launcher killed
    outright (SIGKILL, the OOM killer) leaves nothing running, SIGTERM for a process that removes what it
    started first; elsewhere their own exit paths do what they can. For a child, between fork and exec."""
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, number)  # PR_SET_PDEATHSIG
        if number and os.getppid() != parent:  # the parent died before the request was in place
            os.kill(os.getpid(), number)


def say(exc: StackError, otherwise: str | None = None) -> None:
    """``exc`` on stderr as a trampoline says it: ``error:``, then ``fix:`` (``otherwise`` when it names none)."""
    fix = exc.fix or otherwise
    print(f"error: {exc.message}" + (f"\nfix: {fix}" if fix else ""), file=sys.stderr, flush=True)


@contextlib.contextmanager
def exits_in_one_line(stopped: str) -> Iterator[None]:
    """A trampoline's ending for what it cannot run: a ``StackError`` as two lines (``error:``, ``fix:``), an
    interrupt as ``stopped``, each exiting with Metaflow's "do not retry" (a retry would meet the same)."""
    from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY

    try:
        yield
    except StackError as exc:
        say(exc)
        sys.exit(METAFLOW_EXIT_DISALLOW_RETRY)
    except KeyboardInterrupt:
        print(stopped, file=sys.stderr, flush=True)
        sys.exit(METAFLOW_EXIT_DISALLOW_RETRY)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM held off (in the main thread) while what a task started elsewhere (a job, a VM) is
    removed: a second one must not leave it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
