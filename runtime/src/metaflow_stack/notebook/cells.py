"""What a notebook cell declares for a flow: the flow itself, one of its steps, or code beside them.

The same declarations come from a cell's first line (``%%flow``, ``%%step``, ``%%helpers``, as the
magics run them) or from its tags (``flow:TrainFlow``, ``step:train``, ``next:join``,
``foreach:data``, ``join``, ``decorator:retry(times=2)``, ``param:alpha=0.5``, ``helpers``), so a
notebook written either way assembles and exports the same flow. A declaration that cannot be used
is an error naming the cell and what to change.
"""

from __future__ import annotations

import ast
import hashlib
import keyword
import re
import shlex
from dataclasses import dataclass, field

from metaflow_stack.errors import InvalidInput
from metaflow_stack.notebook.literals import NotLiteral, literal

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STEP = re.compile(r"[a-z][a-z0-9_]*")
#: Names a FlowSpec has already: a step of that name would hide them.
_RESERVED_STEPS = {"name", "next", "input", "index", "cmd", "foreach_stack", "merge_artifacts", "script_name"}
_MAGICS = ("%%flow", "%%step", "%%helpers", "%flow", "%step")


@dataclass(frozen=True)
class Cell:
    """Where a declaration came from: a label a user recognises (``In [5]``, ``cell 7``) and its source."""

    label: str
    source: str


@dataclass(frozen=True)
class FlowDecl:
    """``%%flow NAME``: the flow's class name, its parameters (name to Python literal source) and decorators."""

    name: str
    parameters: tuple[tuple[str, str], ...] = ()
    decorators: tuple[str, ...] = ()
    #: Module-level code of the cell (imports, helpers), placed before the class.
    code: str = ""
    cell: Cell = field(default_factory=lambda: Cell("?", ""))


@dataclass(frozen=True)
class StepDecl:
    """``%%step NAME``: a step, where it goes next, and its body (``self`` works as in a flow's method)."""

    name: str
    body: str
    next: tuple[str, ...] = ()
    foreach: str | None = None
    join: bool = False
    decorators: tuple[str, ...] = ()
    cell: Cell = field(default_factory=lambda: Cell("?", ""))


@dataclass(frozen=True)
class HelpersDecl:
    """``%%helpers [NAME]``: module-level code (imports, functions) the steps use; a name replaces its last."""

    name: str
    code: str
    cell: Cell = field(default_factory=lambda: Cell("?", ""))


Decl = FlowDecl | StepDecl | HelpersDecl


def _quoted(value: str) -> str:
    """``value`` quoted for an error, cut: the message stays one line whatever the cell holds."""
    return repr(value) if len(value) <= 80 else repr(value[:80]) + "..."


def _identifier(value: str, what: str, cell: Cell) -> str:
    if not _NAME.fullmatch(value) or keyword.iskeyword(value):
        raise InvalidInput(
            f"{cell.label} {what}", f"{_quoted(value)} is not a Python name", fix="use letters, digits and _"
        )
    return value


def _step_name(value: str, what: str, cell: Cell) -> str:
    """A name Metaflow takes for a step: lowercase, not one of its own attributes."""
    _identifier(value, what, cell)
    if not _STEP.fullmatch(value) or value in _RESERVED_STEPS:
        raise InvalidInput(
            f"{cell.label} {what}",
            f"{_quoted(value)} cannot name a step",
            fix="lowercase letters, digits and _, not a FlowSpec name",
        )
    return value


def _decorator(value: str, cell: Cell) -> str:
    """A decorator as written after ``@`` (``retry(times=2)``): one, on one line, given back as Python
    writes it (so what goes into the file is that decorator and nothing else)."""
    fix = 'write one as after @, on one line, e.g. "retry(times=2)"'
    try:
        tree = ast.parse(f"@{value}\ndef f(): pass")
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # (a null byte; nesting past the parser's)
        raise InvalidInput(f"{cell.label} decorator", f"{_quoted(value)} is not a decorator", fix=fix) from None
    node = tree.body[0]
    if "\n" in value or len(tree.body) != 1 or not isinstance(node, ast.FunctionDef) or len(node.decorator_list) != 1:
        raise InvalidInput(f"{cell.label} decorator", f"{_quoted(value)} is not one decorator", fix=fix)
    return ast.unparse(node.decorator_list[0])


def _parameter(value: str, cell: Cell) -> tuple[str, str]:
    """``name=default``: the default as a Python literal (``0.5``, ``'text'``), else as a string."""
    name, sep, default = value.partition("=")
    if not sep:
        raise InvalidInput(f"{cell.label} --param", f"{_quoted(value)} has no default", fix="write NAME=DEFAULT")
    try:
        written = repr(literal(default))  # the value, written back by Python (no comment rides along)
    except NotLiteral:
        written = repr(default)
    return _identifier(name, "--param", cell), written


def _options(words: list[str], cell: Cell, allowed: set[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Positional words and ``--option value`` pairs (``--join``: a flag), each option named in ``allowed``."""
    positional: list[str] = []
    options: dict[str, list[str]] = {}
    index = 0
    while index < len(words):
        word = words[index]
        if word.startswith("--"):
            name = word[2:]
            if name not in allowed:
                choices = ", ".join("--" + a for a in sorted(allowed)) or "no option"
                raise InvalidInput(f"{cell.label} {word}", "is not an option here", fix=f"use {choices}")
            if name == "join":
                options.setdefault(name, []).append("")
                index += 1
                continue
            if index + 1 >= len(words):
                raise InvalidInput(f"{cell.label} {word}", "needs a value", fix=f"write {word} VALUE")
            options.setdefault(name, []).append(words[index + 1])
            index += 2
        else:
            positional.append(word)
            index += 1
    return positional, options


def from_magic(line: str, body: str, cell: Cell, magic: str) -> Decl:
    """The declaration of a ``%%flow``/``%%step``/``%%helpers`` cell (``line``: the magic's arguments)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:  # shlex's word for an unclosed quote
        fix = "close the quotes"
        raise InvalidInput(f"{cell.label} %%{magic}", f"cannot read its arguments: {exc}", fix=fix) from None
    if magic == "flow":
        positional, options = _options(words, cell, {"param", "decorator"})
        if len(positional) != 1:
            raise InvalidInput(f"{cell.label} %%flow", "names no flow (or several)", fix="write %%flow FlowName")
        return FlowDecl(
            name=_identifier(positional[0], "%%flow", cell),
            parameters=tuple(_parameter(p, cell) for p in options.get("param", [])),
            decorators=tuple(_decorator(d, cell) for d in options.get("decorator", [])),
            code=body,
            cell=cell,
        )
    if magic == "step":
        positional, options = _options(words, cell, {"next", "foreach", "join", "decorator"})
        if len(positional) != 1:
            raise InvalidInput(f"{cell.label} %%step", "names no step (or several)", fix="write %%step step_name")
        nexts = [n for value in options.get("next", []) for n in value.split(",") if n]
        foreach = options.get("foreach", [None])[-1]
        if foreach and len(nexts) != 1:
            raise InvalidInput(
                f"{cell.label} --foreach", "needs exactly one --next step", fix="--next STEP --foreach VAR"
            )
        return StepDecl(
            name=_step_name(positional[0], "%%step", cell),
            body=body,
            next=tuple(_step_name(n, "--next", cell) for n in nexts),
            foreach=_identifier(foreach, "--foreach", cell) if foreach else None,
            join="join" in options,
            decorators=tuple(_decorator(d, cell) for d in options.get("decorator", [])),
            cell=cell,
        )
    positional, _ = _options(words, cell, set())
    unnamed = "code:" + hashlib.sha256(body.encode()).hexdigest()[:12]  # the same code, the same entry
    return HelpersDecl(name=positional[0] if positional else unnamed, code=body, cell=cell)


def from_source(source: str, cell: Cell, tags: list[str] | tuple[str, ...] = ()) -> Decl | None:
    """The declaration of a notebook cell from its source's magic line, else from its tags (``None``: a cell
    that declares nothing, left out of the flow). Blank lines before the magic are skipped, as IPython does."""
    first, _, rest = source.lstrip("\n").partition("\n")
    first = first.replace("\t", " ")
    for magic in _MAGICS:
        if first == magic or first.startswith(magic + " "):
            # A line magic's cell goes on as plain code (IPython runs it as such): no part of the flow.
            body = "" if not magic.startswith("%%") else rest
            return from_magic(first[len(magic) :].strip(), body, cell, magic.lstrip("%"))
    return _from_tags(source, cell, list(tags))


def _from_tags(source: str, cell: Cell, tags: list[str]) -> Decl | None:
    values: dict[str, list[str]] = {}
    for tag in tags:
        key, _, value = tag.partition(":")
        values.setdefault(key, []).append(value)
    words: list[str] = []
    for key in ("param", "decorator", "next", "foreach"):
        for value in values.get(key, []):
            words += [f"--{key}", value]
    if "join" in values:
        words.append("--join")
    if "flow" in values:
        return from_magic(shlex.join([values["flow"][0], *words]), source, cell, "flow")
    if "step" in values:
        return from_magic(shlex.join([values["step"][0], *words]), source, cell, "step")
    if "helpers" in values or "imports" in values:
        return HelpersDecl(name=f"code:{cell.label}", code=source, cell=cell)
    return None
