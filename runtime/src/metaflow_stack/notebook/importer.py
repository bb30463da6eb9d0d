"""A flow file as a notebook: the way back from ``metaflow notebook export``.

The module's code above the flow class (imports, helpers, their comments)
becomes the ``%%flow`` cell, with the class's parameters and decorators on
the magic line; each step becomes a ``%%step`` cell holding the method's body
as written (comments and multi-line strings kept), its plain last
``self.next(...)`` turned into ``--next``/``--foreach``. The docstrings
become the notebook's first cell, which export leaves out. What a notebook
cannot declare is refused in one line naming it, never dropped: a parameter
with more than a literal default, a join whose inputs are not ``inputs``,
methods that are not steps, class attributes, other base classes, module
code below the class, a ``__main__`` block that does more than run the flow.
"""

from __future__ import annotations

import ast
import shlex
import tokenize
from pathlib import Path
from typing import Any

from metaflow_stack.deploy import require, write_atomically
from metaflow_stack.errors import InvalidInput
from metaflow_stack.notebook.assembler import string_continuations
from metaflow_stack.notebook.literals import NotLiteral, literal

#: What the exported file imports from metaflow by itself (besides the decorators it uses).
_WRITTEN = {"FlowSpec", "step", "Parameter", "current"}


def _refused(path: Path, node: ast.AST, what: str, fix: str) -> InvalidInput:
    return InvalidInput(f"{path.name}, line {getattr(node, 'lineno', '?')}", what, fix=fix)


def _flow_class(path: Path, tree: ast.Module) -> ast.ClassDef:
    found = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and any(ast.unparse(base).split(".")[-1] == "FlowSpec" for base in node.bases)
    ]
    if len(found) != 1:
        raise InvalidInput(str(path), f"defines {len(found)} FlowSpec classes", fix="import a file with one flow")
    flow = found[0]
    if len(flow.bases) != 1 or flow.keywords:
        what = f"class {flow.name} has other bases or keywords than FlowSpec"
        raise _refused(path, flow, what, fix="a notebook's flow derives from FlowSpec alone")
    return flow


def _quoted(text: str) -> str:
    """A word for a magic line: in double quotes when that needs no escaping (readable), else shlex's."""
    return f'"{text}"' if not any(c in text for c in '"$`\\') else shlex.quote(text)


def _runs_the_flow(node: ast.stmt, flow: str) -> bool:
    """``Flow()``, or ``if __name__ == "__main__": Flow()``: what a notebook does with ``%mf_run``."""
    call = f"{flow}()"
    if isinstance(node, ast.Expr):
        return ast.unparse(node) == call
    return (
        isinstance(node, ast.If)
        and "__name__" in ast.unparse(node.test)
        and not node.orelse
        and all(isinstance(s, ast.Expr) and ast.unparse(s) == call for s in node.body)
    )


def _module_code(path: Path, source: list[str], tree: ast.Module, flow: ast.ClassDef, written: set[str]) -> str:
    """The module's code above the class, as written (comments and blank lines kept), less its docstring and
    the names the exported file imports from metaflow by itself (so they are not imported twice)."""
    for node in tree.body[tree.body.index(flow) + 1 :]:
        if not _runs_the_flow(node, flow.name):
            fix = "move it above the class (or into a step)"
            raise _refused(path, node, f"module code below class {flow.name} has no place in a notebook", fix=fix)
    lines: list[str | None] = list(source[: _first_line(flow) - 1])
    for node in tree.body[: tree.body.index(flow)]:
        if node is tree.body[0] and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            lines[node.lineno - 1 : node.end_lineno] = [None] * ((node.end_lineno or node.lineno) - node.lineno + 1)
        elif isinstance(node, ast.ImportFrom) and node.module == "metaflow" and not node.level:
            names = [alias for alias in node.names if alias.asname or alias.name not in written]
            span = (node.end_lineno or node.lineno) - node.lineno + 1
            text = ast.unparse(ast.ImportFrom(module="metaflow", names=names, level=0)) if names else None
            lines[node.lineno - 1 : node.end_lineno] = [text] + [None] * (span - 1)
    return "\n".join(line for line in lines if line is not None).strip("\n")


def _first_line(node: ast.stmt) -> int:
    return min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])


def _parameter(path: Path, node: ast.stmt) -> tuple[str, str] | None:
    """``alpha = Parameter("alpha", default=0.5)`` as ``alpha=0.5``; None when ``node`` is no parameter."""
    if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
        return None
    if ast.unparse(node.value.func).split(".")[-1] != "Parameter":
        return None
    name = ast.unparse(node.targets[0])
    keywords = {k.arg: k.value for k in node.value.keywords}
    named = node.value.args[0] if node.value.args else keywords.pop("name", None)
    keywords.pop("name", None)
    default = keywords.pop("default", None)
    fix = "a notebook declares a parameter's name and a literal default"
    if keywords or len(node.value.args) > 1:
        others = ", ".join(f"{k}=" for k in keywords if k) or "positional arguments"
        raise _refused(path, node, f"parameter {name} has {others}", fix=fix)
    if default is None or not (isinstance(named, ast.Constant) and named.value == name):
        raise _refused(path, node, f"parameter {name} has no default, or a name other than {name!r}", fix=fix)
    try:
        literal(default)
    except NotLiteral:
        raise _refused(
            path, node, f"parameter {name}'s default {ast.unparse(default)} is not a literal", fix=fix
        ) from None
    return name, ast.unparse(default)


def _body(source: list[str], first: int, last: int, indent: int) -> str:
    """Lines ``first`` to ``last`` (1-based) less the body's ``indent``; a multi-line string's inner lines as
    they are (taking their indentation would change the string)."""
    lines = source[first - 1 : last]
    inside = string_continuations("\n".join(line[indent:] if line[:indent].isspace() else line for line in lines))
    kept = [
        line if offset in inside or not line[:indent].isspace() else line[indent:] for offset, line in enumerate(lines)
    ]
    return "\n".join(kept).strip("\n")


def _step_cell(path: Path, source: list[str], method: ast.FunctionDef) -> str:
    """``%%step NAME [options]`` and the method's body; a plain last ``self.next(...)`` becomes options."""
    arguments = [arg.arg for arg in method.args.args]
    if arguments not in (["self"], ["self", "inputs"]) or method.args.vararg or method.args.kwonlyargs:
        what = f"step {method.name} takes ({', '.join(arguments)})"
        raise _refused(path, method, what, fix="a notebook's step takes (self), and a join (self, inputs)")
    decorators = [ast.unparse(d) for d in method.decorator_list if ast.unparse(d).split(".")[-1] != "step"]
    words = [method.name, *(f"--decorator {_quoted(d)}" for d in decorators)]
    if len(arguments) == 2:
        words.append("--join")
    body = list(method.body)
    last = body[-1]
    end = method.end_lineno or method.lineno
    call = last.value if isinstance(last, ast.Expr) and isinstance(last.value, ast.Call) else None
    if call is not None and ast.unparse(call.func) == "self.next":
        targets = [ast.unparse(arg).removeprefix("self.") for arg in call.args]
        foreach = {k.arg: k.value for k in call.keywords}.get("foreach")
        simple = all(isinstance(a, ast.Attribute) for a in call.args) and {k.arg for k in call.keywords} <= {"foreach"}
        if simple and (foreach is None or isinstance(foreach, ast.Constant)):
            words.append(f"--next {','.join(targets)}")
            if foreach is not None:
                words.append(f"--foreach {foreach.value}")
            end = last.lineno - 1
    if body[0].lineno == method.lineno:  # def end(self): pass
        code = "\n".join(ast.unparse(statement) for statement in body if statement.lineno <= end)
    else:
        header = max([method.lineno, *(n.end_lineno or 0 for n in ast.walk(method.args) if hasattr(n, "end_lineno"))])
        code = _body(source, header + 1, end, body[0].col_offset)
    if not code.strip():  # nothing but where it goes: the line magic (IPython refuses a cell magic with no body)
        return f"%step {' '.join(words)}"
    return f"%%step {' '.join(words)}\n{code}"


def _class_member(path: Path, source: list[str], node: ast.stmt, steps: list[str], parameters: list) -> None:
    """One statement of the flow's class: a step or a parameter, else refused naming it."""
    found = _parameter(path, node)
    if found is not None:
        parameters.append(found)
    elif isinstance(node, ast.FunctionDef) and any(
        ast.unparse(d).split(".")[-1] == "step" for d in node.decorator_list
    ):
        steps.append(_step_cell(path, source, node))
    else:
        named = getattr(node, "name", None) or (ast.unparse(node.targets[0]) if isinstance(node, ast.Assign) else "")
        kind = {"FunctionDef": "method", "AsyncFunctionDef": "async method", "Assign": "attribute"}.get(
            type(node).__name__, type(node).__name__.lower()
        )
        fix = "make it a step, or move it out of the class (a helper function above it)"
        raise _refused(path, node, f"the flow's {kind} {named} is not a step or a parameter".replace("  ", " "), fix)


def to_notebook(path: Path) -> Any:
    """The notebook (nbformat) declaring the flow ``path`` defines, ready to ``%mf_run``."""
    nbformat = require("nbformat", extra="notebook")
    try:
        with tokenize.open(path) as readable:  # the file's own encoding (PEP 263), newlines as \n
            text = readable.read()
        tree = ast.parse(text, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as exc:
        raise InvalidInput(str(path), f"is not a Python file: {exc}", fix="name a flow file") from None
    source = text.split("\n")  # as ast counts lines: \n alone
    flow = _flow_class(path, tree)
    decorators = [*flow.decorator_list, *(d for node in flow.body for d in getattr(node, "decorator_list", []))]
    written = _WRITTEN | {ast.unparse(d).split("(")[0].split(".")[-1] for d in decorators}
    module_code = _module_code(path, source, tree, flow, written)
    parameters: list[tuple[str, str]] = []
    steps: list[str] = []
    for node in flow.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node is flow.body[0]:
            continue  # the docstring: the notebook's first cell
        _class_member(path, source, node, steps, parameters)
    words = [flow.name, *(f"--param {_quoted(f'{n}={v}')}" for n, v in parameters)]
    words += [f"--decorator {_quoted(ast.unparse(d))}" for d in flow.decorator_list]
    head = f"%%flow {' '.join(words)}\n{module_code}" if module_code else f"%flow {' '.join(words)}"
    notebook = nbformat.v4.new_notebook()
    docs = [doc for doc in (ast.get_docstring(tree), ast.get_docstring(flow)) if doc]
    cells = [nbformat.v4.new_markdown_cell("\n\n".join([f"# {flow.name}", *docs]))]
    cells += [nbformat.v4.new_code_cell(code) for code in ("%load_ext metaflow_stack.notebook", head, *steps)]
    cells.append(nbformat.v4.new_code_cell("run = %mf_run\nrun"))
    notebook.cells = cells
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


def write(path: Path, target: Path) -> Path:
    """Write ``path``'s flow as the notebook ``target``, whole or not at all."""
    nbformat = require("nbformat", extra="notebook")
    return write_atomically(target, nbformat.writes(to_notebook(path)))
