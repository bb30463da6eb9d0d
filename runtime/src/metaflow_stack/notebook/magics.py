"""The IPython magics: declare a flow across cells, run it with Metaflow's ``Runner``, show its values.

``%%flow``, ``%%step`` and ``%%helpers`` declare (the flow's and helpers'
code also runs in the kernel, so its imports and functions are at hand
there); ``%mf_run`` writes the assembled flow to a folder of its own,
runs it with Metaflow's ``Runner`` from the notebook's folder (its
``.metaflow`` there, as a flow file beside the notebook would) with the
output streaming into the cell, removes the folder, and names the cell
and line of a failed step; ``%mf_resume`` resumes the last run;
``%mf_export`` writes the flow file; ``%mf_show`` shows a value of the last
run. A mistake in a declaration is one line (IPython's ``UsageError``),
never a traceback.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from metaflow_stack.errors import StackError
from metaflow_stack.notebook import cells, export
from metaflow_stack.notebook.assembler import Assembled, NotebookFlow, assemble

_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+)')


def _usage(error: StackError) -> UsageError:
    return UsageError(f"{error.message} (fix: {error.fix})" if error.fix else error.message)


@magics_class
class FlowMagics(Magics):
    """The notebook's flow (``self.notebook``) and its last run (``self.last_run``)."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.notebook = NotebookFlow()
        self.last_run: Any = None

    def _cell(self, source: str) -> cells.Cell:
        # The number the notebook shows for the running cell: the history's last entry (IPython has stored
        # the cell by then; ``execution_count`` is already the next cell's in recent IPython).
        number = len(self.shell.history_manager.input_hist_raw) - 1
        return cells.Cell(f"In [{number}]", source)

    def _declare(self, magic: str, line: str, body: str) -> cells.Decl:
        try:
            decl = cells.from_magic(line, body, self._cell(f"%%{magic} {line}\n{body}"), magic)
        except StackError as exc:
            raise _usage(exc) from None
        self.notebook.declare(decl)
        return decl

    @cell_magic
    def flow(self, line: str, cell: str) -> None:
        """%%flow FlowName [--param NAME=DEFAULT]... [--decorator DECO]...: declare the flow; the cell's code
        (imports, helpers) goes before its class and runs here too."""
        decl = self._declare("flow", line, cell)
        assert isinstance(decl, cells.FlowDecl)
        if cell.strip():
            self.shell.run_cell(cell, store_history=False)
        params = ", ".join(name for name, _ in decl.parameters) or "none"
        print(f"flow {decl.name} (parameters: {params})")

    @cell_magic
    def step(self, line: str, cell: str) -> None:
        """%%step NAME [--next A,B] [--foreach VAR] [--join] [--decorator DECO]...: declare (or replace) a step;
        ``self`` works as in a flow's method."""
        decl = self._declare("step", line, cell)
        assert isinstance(decl, cells.StepDecl)
        each = f" (for each of {decl.foreach})" if decl.foreach else ""
        print(f"step {decl.name} -> {' and '.join(decl.next) or 'the end'}{each}")

    @cell_magic
    def helpers(self, line: str, cell: str) -> None:
        """%%helpers [NAME]: module-level code the steps use (imports, functions); it runs here too."""
        self._declare("helpers", line, cell)
        self.shell.run_cell(cell, store_history=False)

    def _assembled(self) -> Assembled:
        try:
            return assemble(self.notebook)
        except StackError as exc:
            raise _usage(exc) from None

    def _options(self, line: str) -> tuple[list[str], dict[str, str]]:
        """``--with DECO`` (repeatable) and ``NAME=VALUE`` parameters."""
        words = shlex.split(line)
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

    def _run(self, line: str, origin_run_id: str | None = None) -> Any:
        from metaflow import Runner

        assembled = self._assembled()
        decospecs, parameters = self._options(line)
        with tempfile.TemporaryDirectory(prefix="mf-notebook-") as folder:
            path = Path(folder) / assembled.file_name
            path.write_text(assembled.source)
            # JPY_PARENT_PID empty: the run is a plain process, not one of this kernel's (as NBRunner does).
            env = {"JPY_PARENT_PID": ""}
            with Runner(str(path), show_output=True, env=env, cwd=os.getcwd(), decospecs=decospecs) as runner:
                try:
                    if origin_run_id is None:
                        executing = runner.run(**parameters)
                    else:
                        executing = runner.resume(origin_run_id=origin_run_id, **parameters)
                except (TypeError, ValueError) as exc:  # the Runner's word for a parameter it cannot take
                    raise UsageError(str(exc).strip()) from None
                output = executing.stdout + executing.stderr
        run = executing.run
        self.last_run = run
        if not run.successful:
            for place in failure_places(output, assembled):
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
    def mf_export(self, line: str) -> None:
        """%mf_export PATH: write the flow the cells declare as a standalone flow file."""
        target = line.strip()
        if not target:
            raise UsageError("name the file to write: %mf_export flow.py")
        written = export.write(self._assembled(), Path(target))
        print(f"wrote {written}")

    @line_magic
    def mf_show(self, line: str) -> Any:
        """%mf_show NAME, or %mf_show Flow/run/step/task NAME: a value of the last run (or of that task)."""
        from metaflow_stack.notebook import show

        words = line.split()
        if len(words) == 1 and self.last_run is not None:
            return show.value(show.find(self.last_run, words[0].removeprefix("self.")), words[0])
        if len(words) == 2:
            return show.value(show.task_value(words[0], words[1]), words[1])
        raise UsageError("show NAME (of the last run) or Flow/run/step/task NAME")


def _literal(value: str) -> Any:
    """A parameter's value as the Python literal it reads as (``2``, ``0.5``, ``[1, 2]``), else as text."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def failure_places(output: str, assembled: Assembled) -> list[str]:
    """The notebook places (``In [5], line 3``) of the flow file's lines in a run's tracebacks."""
    places: list[str] = []
    for match in _FRAME.finditer(output):
        place = assembled.where(int(match["line"])) if Path(match["path"]).name == assembled.file_name else None
        if place and place not in places:
            places.append(place)
    return places
