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
import io
import textwrap
import tokenize
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

    def forget(self, decl: Decl) -> None:
        """Take back what ``decl`` declared (a cell run again, or renamed: what it said before goes)."""
        if isinstance(decl, StepDecl) and self.steps.get(decl.name) is decl:
            del self.steps[decl.name]
        elif isinstance(decl, HelpersDecl) and self.helpers.get(decl.name) is decl:
            del self.helpers[decl.name]


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

    def add(self, text: str = "", cell: Cell | None = None) -> None:
        """A line the assembler writes; a declaration's own lines (``def``, ``@``) map to its cell's first."""
        self.lines.append(text)
        if cell is not None:
            self.origins[len(self.lines)] = (cell, 1)

    def code(self, code: str, cell: Cell, indent: str = "") -> bool:
        """A declaration's code, dedented and indented by ``indent``; whether it had any.

        Lines inside a multi-line string are left as they are (indenting them would change the string).
        """
        lines = code.split("\n")
        lead = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
        text = textwrap.dedent("\n".join(lines[lead:])).rstrip()
        if not text:
            return False
        first = (2 if cell.source.startswith("%%") else 1) + lead  # the magic's line is the cell's first
        inside = string_continuations(text)
        for offset, line in enumerate(text.split("\n")):
            self.lines.append(line if offset in inside or not line.strip() else indent + line)
            self.origins[len(self.lines)] = (cell, first + offset)
        return True


def string_continuations(code: str) -> set[int]:
    """The 0-based lines of ``code`` that continue a multi-line string."""
    found: set[int] = set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if token.type == tokenize.STRING and token.end[0] > token.start[0]:
                found.update(range(token.start[0], token.end[0]))  # rows are 1-based: these are the lines after
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass  # the compile below names the problem
    return found


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


def _bound(code: str) -> set[str]:
    """The names ``code`` binds at its top level (imports, functions, classes, assignments)."""
    try:
        tree = ast.parse(textwrap.dedent(code))
    except SyntaxError:
        return set()
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.add(node.name)
        elif isinstance(node, ast.Assign):
            found |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return found


def _future_imports(code: str) -> tuple[list[str], str]:
    """``from __future__`` lines of ``code`` (which must open the file) and the code without them (blank lines
    in their place, so every other line keeps its number in the cell)."""
    lines = code.split("\n")
    try:
        tree = ast.parse(textwrap.dedent(code))
    except SyntaxError:
        return [], code
    future = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            future.append(ast.unparse(node))
            lines[node.lineno - 1 : node.end_lineno] = [""] * ((node.end_lineno or node.lineno) - node.lineno + 1)
    return future, "\n".join(lines)


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
    modules = [flow.code, *(h.code for h in notebook.helpers.values())]
    # A decorator the cells import or define themselves (not Metaflow's) is theirs to import.
    bound = set().union(*(_bound(code) for code in modules))
    imported = set(_ALWAYS) | (_names(decorators) - bound) | ({"Parameter"} if flow.parameters else set())
    codes = [*modules, *(s.body for s in steps)]
    if any(_uses(code, "current") for code in codes) and "current" not in bound:
        imported.add("current")
    out = _Writer()
    future, flow_code = _future_imports(flow.code)
    for line in future:  # Python takes them only first in the file
        out.add(line, flow.cell)
    out.add(f"from metaflow import {', '.join(sorted(imported))}")
    for code, cell in [(flow_code, flow.cell), *((h.code, h.cell) for h in notebook.helpers.values())]:
        if code.strip():
            out.add()
            out.code(code, cell)
    out.add()
    out.add()
    for decorator in flow.decorators:
        out.add(f"@{decorator}", flow.cell)
    out.add(f"class {flow.name}(FlowSpec):", flow.cell)
    for name, literal in flow.parameters:
        out.add(f"    {name} = Parameter({name!r}, default={literal})", flow.cell)
    for step in steps:
        out.add()
        for decorator in step.decorators:
            out.add(f"    @{decorator}", step.cell)
        out.add("    @step", step.cell)
        out.add(f"    def {step.name}(self{', inputs' if step.join else ''}):", step.cell)
        had_code = out.code(step.body, step.cell, indent="        ")
        nxt = None if _calls_next(step.body) else _next_call(step)
        if nxt:
            out.add(f"        {nxt}", step.cell)
        elif step.name != "end" and not _calls_next(step.body):
            raise InvalidInput(
                f"{step.cell.label} %%step {step.name}",
                "says nowhere to go next",
                fix="give --next STEP (or call self.next in the cell); only end has no next",
            )
        elif not had_code:
            out.add("        pass", step.cell)
    out.add()
    out.add()
    out.add('if __name__ == "__main__":')
    out.add(f"    {flow.name}()")
    assembled = Assembled(flow.name, "\n".join(out.lines) + "\n", out.origins)
    try:
        compile(assembled.source, assembled.file_name, "exec", dont_inherit=True)
    except SyntaxError as exc:
        label = assembled.where(exc.lineno or 0) or f"line {exc.lineno} of the flow"
        raise StackError(f"{label}: {exc.msg}", fix="correct that cell and run it again") from None
    return assembled
