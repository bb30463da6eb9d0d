"""A pooled task's process: what a pool imports once, and how a forked child becomes the task.

Shared by every backend whose workers fork per task (the local fork server,
the Redis workers): the warm-up, then in the child the task's environment,
folder, arguments and output, and the flow's file run as ``__main__`` as
``python flow.py`` runs it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import runpy
import signal
import sys
import threading
import traceback
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from metaflow_stack.elsewhere import MACHINE_FILES, MACHINE_VARIABLES
from metaflow_stack.pool import WORKER_VARIABLE
from metaflow_stack.trampolines import die_with_parent

#: How a task process finds its signals as Python starts it, which the pool's own handling changed: SIGPIPE
#: ignored (a write to a closed pipe raises ``BrokenPipeError``, which ``subprocess`` and HTTP clients
#: handle, rather than killing the task), Ctrl-C raising ``KeyboardInterrupt``, the rest the kernel's.
STARTUP_SIGNALS = {
    signal.SIGPIPE: signal.SIG_IGN,
    signal.SIGINT: signal.default_int_handler,
    signal.SIGTERM: signal.SIG_DFL,
    signal.SIGCHLD: signal.SIG_DFL,
}
#: A task's exit status when its output could not be flushed as it ended (the interpreter's own).
FLUSH_FAILED = 120
#: After a task's exit status: how long its output may take to close (a process it left behind, still
#: holding it, could otherwise hold its worker forever).
DRAIN_S = 1.0


@dataclass(frozen=True)
class Task:
    """A task as the runtime would have started it: the interpreter it asked for, its command line
    (``python flow.py ... step ...``), its environment and its working folder."""

    python: str
    argv: list[str]
    env: dict[str, str]
    cwd: str


def warm(flow_file: str) -> None:
    """Import the flow's file (not as ``__main__``: its ``if __name__`` block stays unrun) and what a task
    imports, and fill the caches every task would fill again: Metaflow's version and the flow folder's
    git facts (four ``git`` processes per task otherwise)."""
    folder = os.path.dirname(os.path.abspath(flow_file))
    sys.path.insert(0, folder)
    runpy.run_path(flow_file, run_name="__metaflow_stack_pool_warm__")
    from metaflow import metaflow_git, metaflow_version

    metaflow_version.get_version()
    metaflow_version.get_version(public=True)
    metaflow_git.get_repository_info(folder)
    # The step command and everything it reaches, imported once here rather than in every task; but not
    # Metaflow's command line itself, which Metaflow builds at its module's first import with the options
    # of the flow being run (its flow decorators': @project's --branch; its Configs'): each task builds its
    # own (under a millisecond) in its own flow's context, as `python flow.py` does.
    import metaflow.cli
    import metaflow.cli_components.step_cmd  # (stateless: what it takes from metaflow.cli are plain functions)
    import metaflow.task  # noqa: F401

    import metaflow_stack.pool.backend  # what this package's decorators import in each task's step_init
    import metaflow_stack.solved_environment  # noqa: F401

    del sys.modules["metaflow.cli"]
    delattr(sys.modules["metaflow"], "cli")

    # Out of the collector's sight: a collection in a child would otherwise write to every object the
    # server holds and copy each page they share (copy-on-write) into every task.
    gc.collect()
    gc.freeze()


def on_this_machine(
    task: Task, flow_file: str, workdir: str | None = None, passed: Collection[str] | None = None
) -> Task:
    """``task`` as a worker on another machine or in a container runs it (a pod, the container of a
    ``@devcontainer`` pool): this interpreter, this machine's environment with the task's own variables
    over it (but those describing the runtime's machine: its certificate bundle, say, named where this
    machine has none, would break the task; in a sandbox, only the ``passed`` ones: what Metaflow and the
    step's decorators set, none of the host's), the pool's ``flow_file`` when the task's is not here,
    ``workdir`` as its folder (a sandbox's own for the task), else its own folder if here, else the
    flow's."""
    own = {
        name: value
        for name, value in task.env.items()
        if name not in MACHINE_VARIABLES and not (name in MACHINE_FILES and not os.path.exists(value))
    }
    if passed is not None:
        own = {name: value for name, value in own.items() if name in passed}
    env = {**os.environ, **own}
    cwd = workdir or (task.cwd if os.path.isdir(task.cwd) else os.path.dirname(flow_file))
    argv = task.argv if os.path.exists(task.argv[1]) else [task.argv[0], flow_file, *task.argv[2:]]
    return Task(sys.executable, argv, env, cwd)


def same_interpreter(one: str, other: str) -> bool:
    """Whether two interpreter paths run the same Python with the same packages: the same binary, started
    from the same folder (every virtual environment links the one binary it was made from; its folder,
    where ``pyvenv.cfg`` is found, decides what it imports)."""
    folder = os.path.dirname(os.path.abspath(one)) == os.path.dirname(os.path.abspath(other))
    return folder and os.path.realpath(one) == os.path.realpath(other)


def other_interpreter(task: Task, python: str = sys.executable) -> str | None:
    """Why a pool whose workers run ``python`` cannot run ``task`` (it asks for another interpreter: an
    environment decorator's), or None."""
    if same_interpreter(task.python, python):
        return None
    return (
        f"@worker_pool: the pool runs {python} and this task asks for {task.python} "
        "(another decorator chose it): remove @worker_pool from this step, or that decorator"
    )


def run_task(task: Task, fds: tuple[int, int], worker: str) -> int:
    """In a forked child: become the task's process (its stdout and stderr ``fds``) and run Metaflow's
    step command; returns the exit status."""
    os.setsid()  # its own group: a kill reaches the task and whatever it started
    die_with_parent()
    signal.set_wakeup_fd(-1)
    for number, disposition in STARTUP_SIGNALS.items():
        signal.signal(number, disposition)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the pool's sockets and other tasks' connections
    sys.stdout.reconfigure(line_buffering=True)  # the runtime reads the task's output line by line
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir(task.cwd)
    os.environ.clear()
    os.environ.update(task.env)
    os.environ[WORKER_VARIABLE] = worker
    flow_file = task.argv[1]
    refusal = other_interpreter(task)
    if refusal:
        print(refusal, file=sys.stderr)
        return 1
    sys.argv = task.argv[1:]
    script = os.path.abspath(flow_file)  # as Python names a script it runs: tracebacks read the same
    sys.path[0] = os.path.dirname(script)
    main = sys.modules["__main__"]
    main.__file__ = script
    code = 1
    try:
        exec(compile(Path(script).read_bytes(), script, "exec"), vars(main))  # what `python flow.py` does
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # (a message: printed, status 1, as the interpreter does)
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # (the interpreter ends by SIGINT then, once it has run what ends it)
        traceback.print_exc()
        exit_as_python_would()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # what a task process would print before dying
        traceback.print_exc()
        code = 1
    exit_as_python_would()
    return code


def exit_as_python_would() -> None:
    """What the interpreter does on its way out of ``python flow.py`` and a forked child's ``os._exit`` skips:
    wait for the task's threads that are not daemons (after telling its executors to end), then run the
    ``atexit`` callbacks: those of what the flow's file imported in the pool (MLflow's, ending its run) as
    well as the task's own (registered in the pool, they were never run there: it ends by ``os._exit``)."""
    try:
        threading._shutdown()  # (the interpreter's own step: ``concurrent.futures`` hooks into it)
    except BaseException:  # (Ctrl-C while it waits, say: printed, and the callbacks still run)
        traceback.print_exc()
    atexit._run_exitfuncs()  # (each callback's exception printed, as the interpreter does)


def fork_task(task: Task, fds: tuple[int, int], worker: str) -> int:
    """Fork a child that runs ``task`` (``run_task``) and exits with its status; returns its pid. The
    parent's own descriptors ``fds`` stay open: closing them is the caller's business."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = run_task(task, fds, worker)
        finally:
            try:  # (its reader gone: SIGPIPE is ignored, so a flush raises; the child must never leave this)
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:
                code = FLUSH_FAILED
            os._exit(code)
    return pid


def with_group(pid: int, number: int) -> None:
    """Signal a task's process group (it is its own leader), ignoring one already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, number)
