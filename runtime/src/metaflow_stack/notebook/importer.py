"""A flow file as a notebook: the way back from ``metaflow notebook export``.

The flow's module code (imports, helpers) becomes its ``%%flow`` cell, with
the class's parameters and decorators on the magic line; each step becomes
a ``%%step`` cell holding the method's body as written (comments kept),
its ``self.next(...)`` turned into ``--next``/``--foreach`` when it is the
plain last call. What a notebook cannot declare (a parameter with more than
a default, methods that are not steps, class attributes) is refused in one
line naming it, so nothing is dropped silently. Exporting the notebook
gives the flow back.
"""

from __future__ import annotations

import ast
import shlex
import textwrap
from pathlib import Path
from typing import Any

from metaflow_stack.deploy import require, write_atomically
from metaflow_stack.errors import InvalidInput


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
    return found[0]


def _lines(source: list[str], first: ast.stmt, last: ast.stmt) -> str:
    """The source from ``first``'s line to ``last``'s end, as written (comments between them kept)."""
    start = min([first.lineno, *(d.lineno for d in getattr(first, "decorator_list", []))])
    return "\n".join(source[start - 1 : last.end_lineno])


#: What the exported file imports from metaflow by itself (besides the decorators it uses).
_WRITTEN = {"FlowSpec", "step", "Parameter", "current"}


def _module_code(source: list[str], nodes: list[ast.stmt], written: set[str]) -> str:
    """The module's statements as written, a blank line kept where the file had one between them; names
    the exported file imports from metaflow by itself (``written``) left out, so they are not imported twice."""
    kept: list[tuple[ast.stmt, str]] = []
    for node in nodes:
        text = _lines(source, node, node)
        if isinstance(node, ast.ImportFrom) and node.module == "metaflow" and not node.level:
            names = [alias for alias in node.names if alias.asname or alias.name not in written]
            if not names:
                continue
            if len(names) != len(node.names):
                text = ast.unparse(ast.ImportFrom(module="metaflow", names=names, level=0))
        kept.append((node, text))
    parts: list[str] = []
    for index, (node, text) in enumerate(kept):
        if index:
            before = kept[index - 1][0]
            parts.append("\n\n" if node.lineno - (before.end_lineno or before.lineno) > 1 else "\n")
        parts.append(text)
    return "".join(parts)


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)


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
    plain = isinstance(named, ast.Constant) and named.value == name and len(node.value.args) <= 1
    if default is None or keywords or not plain:
        raise _refused(
            path, node, f"parameter {name} has more than a name and a default", fix="a notebook declares NAME=DEFAULT"
        )
    return name, ast.unparse(default)


def _step_cell(path: Path, source: list[str], method: ast.FunctionDef) -> str:
    """``%%step NAME [options]`` and the method's body; a plain last ``self.next(...)`` becomes options."""
    decorators = [ast.unparse(d) for d in method.decorator_list if ast.unparse(d) != "step"]
    words = [method.name, *(f"--decorator {shlex.quote(d)}" for d in decorators)]
    if len(method.args.args) == 2:
        words.append("--join")
    body = list(method.body)
    last = body[-1]
    call = last.value if isinstance(last, ast.Expr) and isinstance(last.value, ast.Call) else None
    if call is not None and ast.unparse(call.func) == "self.next":
        targets = [ast.unparse(arg).removeprefix("self.") for arg in call.args]
        foreach = {k.arg: k.value for k in call.keywords}.get("foreach")
        simple = all(isinstance(a, ast.Attribute) for a in call.args) and set(k.arg for k in call.keywords) <= {
            "foreach"
        }
        if simple and (foreach is None or isinstance(foreach, ast.Constant)):
            words.append(f"--next {','.join(targets)}")
            if foreach is not None:
                words.append(f"--foreach {foreach.value}")
            body = body[:-1]
    if not body:  # nothing but where it goes: the line magic (IPython refuses a cell magic with no body)
        return f"%step {' '.join(words)}"
    return f"%%step {' '.join(words)}\n{textwrap.dedent(_lines(source, body[0], body[-1]))}"


def to_notebook(path: Path) -> Any:
    """The notebook (nbformat) declaring the flow ``path`` defines, ready to ``%mf_run``."""
    nbformat = require("nbformat", extra="notebook")
    try:
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as exc:
        raise InvalidInput(str(path), f"is not a Python file: {exc}", fix="name a flow file") from None
    source = text.splitlines()
    flow = _flow_class(path, tree)
    module = [node for node in tree.body if node is not flow and not _is_main_guard(node)]
    if module and isinstance(module[0], ast.Expr) and isinstance(module[0].value, ast.Constant):
        module = module[1:]  # the module's docstring: the notebook's first cell says it
    decorators = [*flow.decorator_list, *(d for node in flow.body for d in getattr(node, "decorator_list", []))]
    written = _WRITTEN | {ast.unparse(d).split("(")[0].split(".")[-1] for d in decorators}
    module_code = _module_code(source, module, written)
    parameters, steps = [], []
    for node in flow.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and node is flow.body[0]:
            continue  # the docstring: the notebook's first cell
        found = _parameter(path, node)
        if found is not None:
            parameters.append(found)
        elif isinstance(node, ast.FunctionDef) and any(ast.unparse(d) == "step" for d in node.decorator_list):
            steps.append(_step_cell(path, source, node))
        else:
            what = f"{type(node).__name__.lower()} {getattr(node, 'name', '')}".strip()
            fix = "move it out of the class"
            raise _refused(path, node, f"the flow's {what} is not a step or a parameter", fix=fix)
    words = [flow.name, *(f"--param {shlex.quote(f'{n}={v}')}" for n, v in parameters)]
    words += [f"--decorator {shlex.quote(ast.unparse(d))}" for d in flow.decorator_list]
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
