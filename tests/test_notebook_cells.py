"""How notebook cells become a flow file (no kernel, no run): declarations checked and named by their cell,
each line of the file traced back to its cell and line, the code of a cell kept as written."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from metaflow_stack.errors import StackError
from metaflow_stack.notebook import export
from metaflow_stack.notebook.assembler import NotebookFlow, assemble
from metaflow_stack.notebook.cells import Cell, from_magic


def _declare(flow: NotebookFlow, label: str, magic: str, line: str, body: str = "") -> None:
    flow.declare(from_magic(line, body, Cell(label, f"%%{magic} {line}\n{body}"), magic))


def _flow(*steps: tuple[str, str, str]) -> NotebookFlow:
    flow = NotebookFlow()
    _declare(flow, "In [1]", "flow", "TrainFlow --param alpha=0.5")
    for label, line, body in steps:
        _declare(flow, label, "step", line, body)
    return flow


def test_each_line_of_the_file_names_its_cell_and_line() -> None:
    assembled = assemble(_flow(("In [2]", "start --next end", "\n   \nx = 1\ny = 1 / 0"), ("In [3]", "end", "")))
    lines = assembled.source.splitlines()
    failing = lines.index("        y = 1 / 0") + 1
    assert assembled.where(failing) == "In [2], line 5"  # magic, blank, blank, x, y
    assert assembled.where(lines.index("    def start(self):") + 1) == "In [2], line 1"


def test_a_cell_is_kept_as_written() -> None:
    query = 'self.q = """\nSELECT 1\n"""'
    assembled = assemble(_flow(("In [2]", "start --next end", query), ("In [3]", "end", "")))
    assert '        self.q = """\nSELECT 1\n"""' in assembled.source  # the string's own lines unindented
    assert "alpha = Parameter('alpha', default=0.5)" in assembled.source


@pytest.mark.parametrize(
    ("magic", "line", "message"),
    [
        ("flow", "TrainFlow --param alpha", r"In \[3\] --param: 'alpha' has no default"),
        ("step", "start --decorator 'retry('", r"In \[3\] decorator: 'retry\(' is not a decorator"),
        ("step", "start --decorator 'retry\ndef g(): pass\nimport os\n@retry'", r"is not one decorator"),
        ("step", "if --next end", r"In \[3\] %%step: 'if' is not a Python name"),
        ("step", "Start --next end", r"'Start' cannot name a step"),
        ("step", "next --next end", r"'next' cannot name a step"),
        ("step", "fan --next a,b --foreach items", r"--foreach: needs exactly one --next step"),
        ("step", "start --next 'end", r"cannot read its arguments"),
    ],
)
def test_a_declaration_that_cannot_be_used_names_its_cell(magic: str, line: str, message: str) -> None:
    with pytest.raises(StackError, match=message):
        from_magic(line, "", Cell("In [3]", ""), magic)


def test_a_flow_that_cannot_be_assembled_names_the_cell() -> None:
    with pytest.raises(StackError, match=r"In \[4\], line 2: "):
        assemble(_flow(("In [4]", "start --next end", "x = ("), ("In [5]", "end", "")))
    with pytest.raises(StackError, match=r"In \[4\] %%step start: says nowhere to go next"):
        assemble(_flow(("In [4]", "start", "x = 1"), ("In [5]", "end", "")))
    with pytest.raises(StackError, match=r"In \[4\] --next: step 'train' is not declared"):
        assemble(_flow(("In [4]", "start --next train", ""), ("In [5]", "end", "")))
    with pytest.raises(StackError, match="has no end step"):
        assemble(_flow(("In [4]", "start --next start", "")))


def test_defaults_are_values_and_a_step_declared_again_replaces_it() -> None:
    flow = NotebookFlow()
    _declare(flow, "In [1]", "flow", "TrainFlow --param 'a=1 # one' --param name=world")
    _declare(flow, "In [2]", "step", "start --next end", "x = 1")
    _declare(flow, "In [3]", "step", "end", "")
    _declare(flow, "In [4]", "step", "start --next end", "x = 2")
    source = assemble(flow).source
    assert "a = Parameter('a', default=1)" in source and "name = Parameter('name', default='world')" in source
    assert "x = 2" in source and "x = 1" not in source
    flow.forget(flow.steps["start"])
    assert "start" not in flow.steps


def _code(source: object, tags: object = None) -> dict:
    cell = {"cell_type": "code", "metadata": {} if tags is None else {"tags": tags}, "outputs": []}
    return {**cell, "source": source} if source is not None else cell


GOOD = [_code("%%flow F\nimport os"), _code("%%step start --next end\nself.x = 1"), _code("%step end")]


@pytest.mark.parametrize(
    ("first", "says"),
    [
        (_code("x", tags=[1]), r"cell 1 tags: are not a list of text"),
        (_code("x", tags="flow:F"), r"cell 1 tags: are not a list of text"),
        (_code(None), r"cell 1 source: is missing"),
        (_code(5), r"cell 1 source: is int, not text"),
        ({"cell_type": "code", "source": "x", "outputs": []}, r"is not a notebook: .*metadata"),
        (_code("%%flow F --decorator '" + "-" * 100_000 + "x'"), r"cell 1 decorator: '-{80}'\.\.\. is not a decor"),
    ],
    ids=["number tag", "tags as text", "no source", "number source", "no metadata", "decorator past the parser"],
)
def test_a_malformed_notebook_is_one_error_naming_its_cell(tmp_path: Path, first: dict, says: str) -> None:
    path = tmp_path / "odd.ipynb"
    cells = [first, *GOOD[1:]] if "%%flow" in str(first.get("source")) else [first, *GOOD]
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 4, "metadata": {}, "cells": cells}))
    with pytest.raises(StackError, match=says):
        export.from_notebook(path)


def test_a_default_that_parses_but_builds_no_value_is_text() -> None:
    flow = NotebookFlow()
    _declare(flow, "In [1]", "flow", "F --param 'x={[1]: 2}'")
    assert flow.flow is not None and flow.flow.parameters == (("x", "'{[1]: 2}'"),)


def test_cells_whose_source_is_a_list_of_lines_declare_as_text_does() -> None:
    """nbformat stores a cell's source as one string or as its lines: a front end may hand either over."""
    lines = [{**cell, "source": cell["source"].splitlines(keepends=True)} for cell in GOOD]
    notebook = nbformat.from_dict({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": lines})
    assert export.from_cells(notebook).source == export.from_cells(nbformat.from_dict({"cells": GOOD})).source
