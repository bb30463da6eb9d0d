"""The flow file a notebook's declarations describe, and where each of its lines came from.

The file is what a user would have written: Metaflow's imports (and the
decorators the cells name), the flow cell's code and the helper cells in
order, then the class with its parameters and one method per step, each
step's cell body indented into it and its ``self.next(...)`` added from
``--next``/``--foreach`` unless the body calls it. A step declared again
replaces the one before. ``where(line)`` names the notebook cell and line a
line of the file came from, so an error in a run points into the notebook.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field

from metaflow_stack.errors import InvalidInput, StackError
from metaflow_stack.notebook.cells import Cell, Decl, FlowDecl, HelpersDecl, StepDecl

_ALWAYS = ("FlowSpec", "step")


@dataclass
class NotebookFlow:
    """The declarations made so far: one flow, its steps by name (in the order first declared), helpers."""

    flow: FlowDecl | None = None
    steps: dict[str, StepDecl] = field(default_factory=dict)
    helpers: dict[str, HelpersDecl] = field(default_factory=dict)

    def declare(self, decl: Decl) -> None:
        if isinstance(decl, FlowDecl):
            if self.flow is not None and self.flow.name != decl.name:
                self.steps.clear()  # another flow: the last one's steps are not its
                self.helpers.clear()
            self.flow = decl
        elif isinstance(decl, StepDecl):
            self.steps[decl.name] = decl
        else:
            self.helpers[decl.name] = decl


@dataclass(frozen=True)
class Assembled:
    """A flow file's source, its flow's name, and where each of its lines came from."""

    name: str
    source: str
    #: 1-based line of the file to (cell, 1-based line in the cell's code), for lines that came from a cell.
    origins: dict[int, tuple[Cell, int]]

    @property
    def file_name(self) -> str:
        return f"{self.name.lower()}.py"

    def where(self, line: int) -> str | None:
        """``In [5], line 3`` for a line of the file that came from a cell."""
        found = self.origins.get(line)
        return f"{found[0].label}, line {found[1]}" if found else None


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.origins: dict[int, tuple[Cell, int]] = {}

    def add(self, text: str = "") -> None:
        self.lines.append(text)

    def code(self, code: str, cell: Cell, indent: str = "", first_line: int = 1) -> None:
        for offset, line in enumerate(code.splitlines()):
            self.lines.append(indent + line if line.strip() else "")
            self.origins[len(self.lines)] = (cell, first_line + offset)


def _names(decorators: list[str]) -> set[str]:
    """The names decorators are called by (``retry`` of ``retry(times=2)``), to import from Metaflow."""
    found = set()
    for text in decorators:
        node = ast.parse(f"@{text}\ndef f(): pass").body[0]
        target = node.decorator_list[0]  # type: ignore[attr-defined]
        target = target.func if isinstance(target, ast.Call) else target
        if isinstance(target, ast.Name):
            found.add(target.id)
    return found


def _uses(code: str, name: str) -> bool:
    """Whether ``code`` refers to ``name`` (``current``, say), so the file imports it only then."""
    try:
        tree = ast.parse(textwrap.dedent(code))
    except SyntaxError:
        return False
    return any(isinstance(node, ast.Name) and node.id == name for node in ast.walk(tree))


def _calls_next(body: str) -> bool:
    try:
        tree = ast.parse(textwrap.dedent(body))
    except SyntaxError:
        return False
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "next"
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        for node in ast.walk(tree)
    )


def _next_call(step: StepDecl) -> str | None:
    if not step.next:
        return None
    targets = ", ".join(f"self.{name}" for name in step.next)
    return f"self.next({targets}, foreach={step.foreach!r})" if step.foreach else f"self.next({targets})"


def assemble(notebook: NotebookFlow) -> Assembled:
    """The flow file of ``notebook``'s declarations; one line naming what is missing when it has none."""
    flow = notebook.flow
    if flow is None:
        raise StackError("no flow is declared", fix="declare one in a cell: %%flow FlowName")
    steps = list(notebook.steps.values())
    if "start" not in notebook.steps or "end" not in notebook.steps:
        missing = [name for name in ("start", "end") if name not in notebook.steps]
        raise StackError(f"{flow.name} has no {' or '.join(missing)} step", fix="declare it: %%step start --next ...")
    for step in steps:
        for target in step.next:
            if target not in notebook.steps:
                raise InvalidInput(
                    f"{step.cell.label} --next", f"step {target!r} is not declared", fix=f"declare it: %%step {target}"
                )
    decorators = [*flow.decorators, *(d for step in steps for d in step.decorators)]
    imported = set(_ALWAYS) | _names(decorators) | ({"Parameter"} if flow.parameters else set())
    codes = [flow.code, *(h.code for h in notebook.helpers.values()), *(s.body for s in steps)]
    if any(_uses(code, "current") for code in codes):
        imported.add("current")
    out = _Writer()
    out.add(f"from metaflow import {', '.join(sorted(imported))}")
    if flow.code.strip() and flow.cell is not None:
        out.add()
        out.code(flow.code.strip("\n"), flow.cell, first_line=2)  # the magic's line is the cell's first
    for helper in notebook.helpers.values():
        out.add()
        out.code(helper.code.strip("\n"), helper.cell, first_line=_first_line(helper.cell))
    out.add()
    out.add()
    for decorator in flow.decorators:
        out.add(f"@{decorator}")
    out.add(f"class {flow.name}(FlowSpec):")
    for name, literal in flow.parameters:
        out.add(f"    {name} = Parameter({name!r}, default={literal})")
    for step in steps:
        out.add()
        for decorator in step.decorators:
            out.add(f"    @{decorator}")
        out.add("    @step")
        out.add(f"    def {step.name}(self{', inputs' if step.join else ''}):")
        body = textwrap.dedent(step.body).strip("\n")
        if body.strip():
            out.code(body, step.cell, indent="        ", first_line=_first_line(step.cell, step.body))
        nxt = None if _calls_next(step.body) else _next_call(step)
        if nxt:
            out.add(f"        {nxt}")
        elif not body.strip():
            out.add("        pass")
    out.add()
    out.add()
    out.add('if __name__ == "__main__":')
    out.add(f"    {flow.name}()")
    source = "\n".join(out.lines) + "\n"
    try:
        compile(source, f"{flow.name.lower()}.py", "exec")
    except SyntaxError as exc:
        where = out.origins.get(exc.lineno or 0)
        label = f"{where[0].label}, line {where[1]}" if where else f"line {exc.lineno} of the flow"
        raise StackError(f"{label}: {exc.msg}", fix="correct that cell and run it again") from None
    return Assembled(flow.name, source, out.origins)


def _first_line(cell: Cell, body: str | None = None) -> int:
    """The cell line a declaration's code starts on: after its magic line, when it has one."""
    starts_with_magic = cell.source.lstrip().startswith("%%")
    leading_blank = 0
    if body is not None:
        leading_blank = len(body) - len(body.lstrip("\n"))
    return (2 if starts_with_magic else 1) + leading_blank
