"""The IPython magics: declare a flow across cells, run it with Metaflow's ``Runner``, show its values.

``%%flow``, ``%%step`` and ``%%helpers`` declare (the flow's and helpers'
code also runs in the kernel, so its imports and functions are at hand
there); ``%mf_run`` writes the assembled flow to a folder of its own,
runs it with Metaflow's ``Runner`` from the notebook's folder (its
``.metaflow`` there, as a flow file beside the notebook would) with the
output streaming into the cell, removes the folder, and names the cell
and line of a failed step; ``%mf_resume`` resumes the last run; ``%mf_spin`` runs one step again
against the last run's inputs;
``%mf_export`` writes the flow file; ``%mf_show`` shows a value of the last
run. A mistake in a declaration is one line (IPython's ``UsageError``),
never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class, no_var_expand

from metaflow_stack.errors import StackError
from metaflow_stack.ids import is_number
from metaflow_stack.notebook import cells, export
from metaflow_stack.notebook.assembler import Assembled, NotebookFlow, assemble
from metaflow_stack.notebook.literals import NotLiteral, literal

#: Bytes read from the end of each of a failed run's output streams to find the cells it failed in.
MAX_FAILED_OUTPUT = 1024 * 1024
#: A traceback's frame, or Metaflow's validity checker pointing at a line of the flow file.
_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+)|found an issue on line (?P<checked>\d+)')


def _usage(error: StackError) -> UsageError:
    return UsageError(str(error))


@magics_class
class FlowMagics(Magics):
    """The notebook's flow (``self.notebook``) and its last run (``self.last_run``)."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.notebook = NotebookFlow()
        self.last_run: Any = None
        #: Each step spun since the last run: its spun task and the values it was spun on (its inputs' overrides).
        self._spins: dict[str, tuple[Any, dict[str, Any]]] = {}
        #: The running cell's id (front ends that send one), and what each cell declared last.
        self._cell_id: str | None = None
        self._declared_by: dict[str, cells.Decl] = {}
        shell.events.register("pre_run_cell", self._note_cell)

    def _note_cell(self, info: Any) -> None:
        self._cell_id = getattr(info, "cell_id", None)

    def _cell(self, source: str) -> cells.Cell:
        # The number the notebook shows for the running cell: the history's last entry (IPython has stored
        # the cell by then; ``execution_count`` is already the next cell's in recent IPython).
        number = len(self.shell.history_manager.input_hist_raw) - 1
        return cells.Cell(f"In [{number}]", source)

    def _declare(self, magic: str, line: str, body: str, runs_here: bool = False) -> cells.Decl:
        """Declare what the cell says; code that also runs here must run first (a cell that fails declares
        nothing). A cell run again (as its front end names it) replaces what it declared before."""
        try:
            decl = cells.from_magic(line, body, self._cell(f"%%{magic} {line}\n{body}"), magic)
        except StackError as exc:
            raise _usage(exc) from None
        if runs_here and body.strip() and not self.shell.run_cell(body, store_history=False).success:
            raise UsageError(f"{decl.cell.label}: its code failed here (above), so it declares nothing")
        if self._cell_id is not None:
            before = self._declared_by.get(self._cell_id)
            if before is not None and type(before) is type(decl):
                self.notebook.forget(before)
            self._declared_by[self._cell_id] = decl
        self.notebook.declare(decl)
        return decl

    @no_var_expand
    @line_cell_magic
    def flow(self, line: str, cell: str | None = None) -> None:
        """%%flow FlowName [--param NAME=DEFAULT]... [--decorator DECO]...: declare the flow; the cell's code
        (imports, helpers) goes before its class and runs here too. ``%flow ...`` alone: a flow with no code."""
        decl = self._declare("flow", line, cell or "", runs_here=True)
        assert isinstance(decl, cells.FlowDecl)
        params = ", ".join(name for name, _ in decl.parameters) or "none"
        print(f"flow {decl.name} (parameters: {params})")

    @no_var_expand
    @line_cell_magic
    def step(self, line: str, cell: str | None = None) -> None:
        """%%step NAME [--next A,B] [--foreach VAR] [--join] [--decorator DECO]...: declare (or replace) a step;
        ``self`` works as in a flow's method. ``%step ...`` alone: a step with no code of its own."""
        decl = self._declare("step", line, cell or "")
        assert isinstance(decl, cells.StepDecl)
        each = f" (for each of {decl.foreach})" if decl.foreach else ""
        following = " and ".join(decl.next) or ("the flow's end" if decl.name == "end" else "where its self.next says")
        print(f"step {decl.name} -> {following}{each}")

    @no_var_expand
    @cell_magic
    def helpers(self, line: str, cell: str) -> None:
        """%%helpers [NAME]: module-level code the steps use (imports, functions); it runs here too."""
        self._declare("helpers", line, cell, runs_here=True)

    @line_magic
    def mf_reset(self, line: str) -> None:
        """%mf_reset: forget every declaration (then declare the flow again, cell by cell)."""
        self.notebook = NotebookFlow()
        self._declared_by.clear()
        self._spins.clear()
        print("the notebook declares no flow now")

    def _assembled(self) -> Assembled:
        try:
            return assemble(self.notebook)
        except StackError as exc:
            raise _usage(exc) from None

    def _options(self, line: str) -> tuple[list[str], dict[str, Any]]:
        """``--with DECO`` (repeatable) and ``NAME=VALUE`` parameters."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"cannot read the options: {exc} (close the quotes)") from None
        decospecs, parameters = [], {}
        index = 0
        while index < len(words):
            if words[index] == "--with" and index + 1 < len(words):
                decospecs.append(words[index + 1])
                index += 2
                continue
            name, sep, value = words[index].partition("=")
            if not sep:
                raise UsageError(f"{words[index]!r}: give parameters as NAME=VALUE and decorators as --with DECO")
            parameters[name] = _literal(value)
            index += 1
        return decospecs, parameters

    def _executing(
        self, line: str, act: Callable[[Any, dict[str, Any]], Any], live: bool = False
    ) -> tuple[Any, str, Assembled, Path, Any]:
        """``act(runner, parameters)`` on the assembled flow, its file beside the notebook (as a flow file
        written there: its folder is the run's path and code package, so modules beside the notebook import)
        under a name of its own, removed whatever way the run ends; ``live``: with the DAG widget under the
        cell (when the front end is built)."""
        assembled = self._assembled()
        decospecs, parameters = self._options(line)
        path = Path.cwd() / f"_mf_notebook_{assembled.name.lower()}_{secrets.token_hex(4)}.py"
        path.write_text(assembled.source)
        try:
            executing, output, dag = _executed(path, decospecs, parameters, act, assembled, live)
        finally:
            path.unlink(missing_ok=True)
            _forget_module(path)
        return executing, output, assembled, path, dag

    def _run(self, line: str, origin_run_id: str | None = None) -> Any:
        def act(runner: Any, parameters: dict[str, Any]) -> Any:
            if origin_run_id is None:
                return runner.run(**parameters)
            return runner.resume(origin_run_id=origin_run_id, **parameters)

        executing, output, assembled, path, dag = self._executing(line, act, live=True)
        run = executing.run
        self.last_run = run
        self._spins.clear()
        if dag is not None:
            with contextlib.suppress(Exception):  # the widget is a view of the run: the run is returned anyway
                dag.finished(run)
        if not run.successful:
            for place in failure_places(output, assembled, path):
                print(f"failed at {place}")
        return run

    @line_magic
    def mf_run(self, line: str) -> Any:
        """%mf_run [NAME=VALUE]... [--with DECO]...: run the flow the cells declare; its run."""
        return self._run(line)

    @line_magic
    def mf_resume(self, line: str) -> Any:
        """%mf_resume [--with DECO]...: resume the last run from its failed step (with that run's parameters)."""
        if self.last_run is None:
            raise UsageError("nothing to resume: run the flow first (%mf_run)")
        return self._run(line, origin_run_id=self.last_run.id)

    @line_magic
    def mf_spin(self, line: str) -> Any:
        """%mf_spin STEP (or RUN/STEP/TASK): run one step again, with the cells as they are now, against the
        inputs it had in the last run (Metaflow's spin); the spun task, also bound as ``spun``. After a spin
        of the step declared before it, the step takes what that spin changed: spin a flow step by step."""
        words = line.split()
        if len(words) != 1:
            raise UsageError("name the step to spin: %mf_spin train (or RUN/STEP/TASK for one foreach item)")
        if self.last_run is None and "/" not in words[0]:
            raise UsageError("nothing to spin against: run the flow first (%mf_run)")
        target = words[0] if "/" in words[0] else f"{self.last_run.id}/{words[0]}"
        step = _spun_step(target, self._assembled().name)
        with self._spun_inputs(step) as (module, overrides):
            # persist: the spun task's artifacts are kept (in .metaflow_spin), so the notebook can read them.
            options: dict[str, Any] = {"persist": True, **({"artifacts_module": module} if module else {})}
            executing, *_ = self._executing("", lambda runner, _: runner.spin(target, **options))
        task = executing.task
        self._spins[step] = (task, overrides)
        self.shell.push({"spun": task})
        return task

    @contextlib.contextmanager
    def _spun_inputs(self, step: str) -> Iterator[tuple[str | None, dict[str, Any]]]:
        """What ``step`` is spun on: the values its declared parent's spin changed (over those the parent was
        spun on), as Metaflow's spin takes overrides of a step's inputs (a module defining ``ARTIFACTS``);
        ``(None, {})`` when the parent was not spun since the last run, or ``step`` is a join (several
        inputs) or runs per foreach item (the item's index is the last run's)."""
        parent = next((name for name, decl in self.notebook.steps.items() if step in decl.next), None)
        declared = self.notebook.steps.get(step)
        if parent not in self._spins or declared is None or declared.join or self._per_item(step):
            yield None, {}
            return
        spun, overrides = self._spins[parent]
        values = dict(overrides)
        values.update(_changed(spun, self.last_run, parent))
        if not values:
            yield None, {}
            return
        folder = Path(tempfile.mkdtemp(prefix="mf-notebook-spin-"))  # 0700: the values are the user's
        try:
            stored = folder / "values.pkl"
            with stored.open("wb") as out:
                pickle.dump(values, out)
            module = folder / "spun_inputs.py"
            loads = f"pickle.loads(pathlib.Path({str(stored)!r}).read_bytes())"
            module.write_text(f"import pathlib\nimport pickle\n\nARTIFACTS = {loads}\n")
            print(f"{step} takes {parent}'s values from its spin: {', '.join(sorted(values))}")
            yield str(module), values
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _per_item(self, step: str) -> bool:
        """Whether ``step`` ran once per foreach item in the last run (more than one task)."""
        try:
            return len(list(self.last_run[step])) > 1
        except KeyError:
            return False

    @line_magic
    def mf_export(self, line: str) -> None:
        """%mf_export PATH: write the flow the cells declare as a standalone flow file."""
        target = line.strip()
        if not target:
            raise UsageError("name the file to write: %mf_export flow.py")
        try:
            written = export.write(self._assembled(), Path(target).expanduser())  # (~ as a shell reads it)
        except OSError as exc:
            raise UsageError(f"{target} cannot be written: {exc.strerror}") from None
        print(f"wrote {written}")

    @line_magic
    def mf_show(self, line: str) -> Any:
        """%mf_show NAME (self.NAME: the last run's artifact; else a variable here, such as an agent query's
        answer), %mf_show Flow/run/step/task NAME, or %mf_show Flow/run/step/task (its cards); --page N for
        a DataFrame's next rows, --full to load a value bigger than the preview limit."""
        from metaflow_stack.notebook import show

        words, page, full = _show_options(line)
        if len(words) == 2:
            return show.artifact(show.task_artifact(*words), words[1], " ".join(words), page, full)
        if len(words) != 1:
            raise UsageError("show NAME (of the last run, or a variable), Flow/run/step/task NAME, or a task's cards")
        word = words[0]
        if word.count("/") == 3:
            return show.cards(show.task_of(word))
        name = word.removeprefix("self.")
        if not word.startswith("self.") and word in self.shell.user_ns:
            return self._shown_variable(self.shell.user_ns[word], word, page, full)
        if self.last_run is None:
            raise UsageError(f"{word!r} is neither a variable here nor a value of a run (fix: %mf_run first)")
        return show.artifact(show.find(self.last_run, name), name, word, page, full)

    def _shown_variable(self, data: Any, name: str, page: int, full: bool) -> Any:
        """A variable shown; an agent query's artifact (``ArtifactInfo``) stands for the value it names."""
        from metaflow_stack.notebook import show

        if "metaflow_stack.ArtifactInfo" in show.kinds(data):
            found = show.task_artifact(data.pathspec, data.name)
            return show.artifact(found, data.name, f"{data.pathspec} {data.name}", page, full)
        return show.value(data, name, page)


def _executed(
    path: Path,
    decospecs: list[str],
    parameters: dict[str, Any],
    act: Callable[[Any, dict[str, Any]], Any],
    assembled: Assembled,
    live: bool,
) -> tuple[Any, str, Any]:
    """What ``act`` ran on ``path`` with Metaflow's Runner (a run, a resume, a spin), the end of what it
    printed when it failed, and its live DAG (``live`` and the widget built, else None); a run Metaflow will
    not start (its checks, a decorator it does not know) is one line naming the cell."""
    from metaflow import Runner

    # JPY_PARENT_PID empty: the run is a plain process, not one of this kernel's (as NBRunner does).
    options = {"show_output": True, "env": {"JPY_PARENT_PID": ""}, "cwd": os.getcwd(), "decospecs": decospecs}
    try:
        runner = Runner(str(path), **options)
    except Exception as exc:  # loading the flow file ran its code: whatever it raised is the user's
        raise UsageError(_refusal(exc, assembled, path)) from None
    dag = _live_dag(assembled.name, path) if live else None
    with runner:
        try:
            with dag.progress.watching() if dag is not None else contextlib.nullcontext():
                executing = act(runner, parameters)
        except (TypeError, ValueError, RuntimeError) as exc:  # a parameter it cannot take, a run it refused
            if dag is not None:
                dag.stopped("refused")
            raise UsageError(_refusal(exc, assembled, path)) from None
        except BaseException:  # an interrupt: the run's processes go with the cell
            for command in runner.spm.commands.values():
                command.kill()
            if dag is not None:
                dag.progress.settle("killed")
                dag.stopped("interrupted")
            raise
        return executing, _failed_output(executing), dag


def _failed_output(executing: Any) -> str:
    """The end of what a failed run printed (stdout, then stderr: where its tracebacks are), read before the
    Runner removes its log files; nothing for a run that did not fail (its output already streamed into
    the cell, and a run may print gigabytes)."""
    if executing.status == "successful":
        return ""
    logs = executing.command_obj.log_files  # (the files Metaflow's ``ExecutingRun.stdout`` reads whole)
    return "".join(_tail(Path(logs[stream])) for stream in ("stdout", "stderr") if logs.get(stream))


def _tail(path: Path) -> str:
    """The last ``MAX_FAILED_OUTPUT`` bytes of ``path``, as text."""
    with path.open("rb") as log:
        log.seek(max(0, log.seek(0, os.SEEK_END) - MAX_FAILED_OUTPUT))
        return log.read().decode("utf-8", errors="replace")


def _live_dag(flow: str, path: Path) -> Any:
    """The run's DAG widget, or None where it cannot be drawn (anywidget missing, the front end not built,
    a front end that cannot take it): the run goes on, printing."""
    try:
        from metaflow_stack.notebook import widget

        return widget.LiveDag(flow, str(path)) if widget.available() else None
    except Exception:  # the widget is a view of the run, never a reason not to run it
        return None


def _refusal(error: BaseException, assembled: Assembled, path: Path) -> str:
    """One line for a run that never started: Metaflow's last word, and the cell it points at."""
    import traceback

    text = str(error).strip()
    frames = "\n".join(f'File "{f.filename}", line {f.lineno}' for f in traceback.extract_tb(error.__traceback__))
    places = failure_places(f"{text}\n{frames}", assembled, path)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("Stdout", "Stderr"))]
    reason = lines[-1] if lines else type(error).__name__
    return f"{places[-1]}: {reason}" if places else reason


def _forget_module(path: Path) -> None:
    """Drop the flow module Metaflow's Runner loaded into this kernel (it keeps one per file, for good)."""
    try:
        from metaflow.runner import click_api
    except ImportError:
        return
    getattr(click_api, "loaded_modules", {}).pop(str(path), None)


def _spun_step(target: str, flow: str) -> str:
    """The step of a spin's pathspec, read as Metaflow's spin reads it (every form it takes)."""
    from metaflow.exception import CommandException
    from metaflow.util import parse_spin_pathspec

    try:
        return parse_spin_pathspec(target, flow)[0]
    except CommandException as exc:
        raise UsageError(str(exc).splitlines()[0]) from None


def _changed(spun: Any, run: Any, step: str) -> dict[str, Any]:
    """The values ``spun`` holds that differ from what ``step`` gave in ``run`` (by content hash): what the
    spin changed. What it passed through untouched is left out (spin stores those from the last run, so they
    are not its values to pass on); a value that cannot be loaded here is one line naming it."""
    try:
        before = {artifact.id: artifact.sha for artifact in run[step].task}
    except KeyError:
        before = {}
    changed = {}
    for artifact in spun:
        if artifact.id.startswith("_") or artifact.id == "name" or before.get(artifact.id) == artifact.sha:
            continue
        try:
            changed[artifact.id] = artifact.data
        except Exception as exc:  # a class this kernel cannot import, say
            raise UsageError(f"{step}'s spun value {artifact.id!r} cannot be loaded here: {exc}") from None
    return changed


def _show_options(line: str) -> tuple[list[str], int, bool]:
    """%mf_show's words, and its --page N and --full options."""
    words, page, full = [], 1, False
    given = line.split()
    index = 0
    while index < len(given):
        if given[index] == "--full":
            full = True
        elif given[index] == "--page":
            number = given[index + 1] if index + 1 < len(given) else ""
            if not is_number(number) or len(number) > 18 or int(number) < 1:
                raise UsageError(f"--page takes a page number from 1, not {number[:20]!r}")
            page, index = int(number), index + 1
        else:
            words.append(given[index])
        index += 1
    return words, page, full


def _literal(value: str) -> Any:
    """A parameter's value as the Python literal it reads as (``2``, ``0.5``, ``[1, 2]``), else as text."""
    try:
        return literal(value)
    except NotLiteral:
        return value


def failure_places(output: str, assembled: Assembled, path: Path) -> list[str]:
    """The notebook places (``In [5], line 3``) of the lines of ``path`` (the assembled file) in tracebacks."""
    places: list[str] = []
    for match in _FRAME.finditer(output):
        if match["checked"]:
            place = assembled.where(int(match["checked"]))
        else:
            place = assembled.where(int(match["line"])) if Path(match["path"]).name == path.name else None
        if place and place not in places:
            places.append(place)
    return places
