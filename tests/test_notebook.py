"""Flows across a notebook's cells, executed headless in a real kernel (nbclient): a branch, a foreach, a
join and a retried item declared with ``%%flow``/``%%step``/``%%helpers``, run with ``%mf_run`` (Metaflow's
Runner), a failing step named by its cell, resumed; exported (``%mf_export``, ``metaflow notebook export``,
from magics and from cell tags alike) and the exported file run to the same values."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from conftest import run_cli
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

#: (source, tags) of each cell: the flow the notebook declares, in magics.
FLOW_CELLS = [
    ("%%flow TrainFlow --param alpha=0.5\nimport math", []),
    ("%%helpers\ndef square(x):\n    return x * x", []),
    ("%%step start --next fan,other\nself.started = True", []),
    ("%%step fan --next each --foreach items\nself.items = [1, 2, 3]", []),
    (
        '%%step each --next gather --decorator "retry(times=1)"\n'
        "if self.input == 2 and current.retry_count == 0:\n"
        '    raise RuntimeError("the first attempt of item 2 fails")\n'
        "self.value = square(self.input) * self.alpha",
        [],
    ),
    ("%%step gather --join --next join\nself.total = sum(i.value for i in inputs)", []),
    ('%%step other --next join\nself.note = f"alpha {self.alpha}"', []),
    ("%%step join --join --next end\nself.total = inputs.gather.total\nself.note = inputs.other.note", []),
    ('%%step end\nself.result = f"{self.note}: {self.total}"', []),
]


def _notebook(cells: list[tuple[str, list[str]]]) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source, metadata={"tags": tags}) for source, tags in cells]
    return notebook


def _outputs(cell: nbformat.NotebookNode) -> str:
    """What a cell printed and returned, as text."""
    texts = []
    for output in cell.get("outputs", []):
        texts.append(output.get("text", ""))
        texts.append(output.get("data", {}).get("text/plain", ""))
        texts.append(output.get("evalue", ""))
    return "\n".join(texts)


def _tagged(cells: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """The same flow declared with cell tags instead of magics."""
    tagged = []
    for source, _ in cells:
        first, _, body = source.partition("\n")
        magic, *words = first.split(" ", 1)
        tags = [f"{magic[2:]}" if magic == "%%helpers" else ""]
        args = words[0] if words else ""
        if magic == "%%flow":
            tags = ["flow:TrainFlow", "param:alpha=0.5"]
        elif magic == "%%step":
            import shlex

            parts = shlex.split(args)
            tags = [f"step:{parts[0]}"]
            index = 1
            while index < len(parts):
                if parts[index] == "--join":
                    tags.append("join")
                    index += 1
                else:  # a tag holds no comma (nbformat's rule): a branch is one next: tag per step
                    tags += [f"{parts[index][2:]}:{value}" for value in parts[index + 1].split(",")]
                    index += 2
        tagged.append((body, tags))
    return tagged


def test_a_notebook_flow_runs_fails_at_its_cell_resumes_and_exports(tmp_path: Path) -> None:
    leftovers = set(Path(tempfile.gettempdir()).glob("mf-notebook-*"))
    cells = [
        ("%load_ext metaflow_stack.notebook", []),
        *FLOW_CELLS,
        ("run = %mf_run alpha=2\nrun.successful, run.data.result", []),
        ("%mf_show total", []),
        ('%%step end\nraise ValueError("the end is broken")', []),
        ("broken = %mf_run alpha=2\nbroken.successful", []),
        ('%%step end\nself.result = f"{self.note}: {self.total}"', []),
        ("resumed = %mf_resume\nresumed.successful, resumed.data.result, resumed.id != broken.id", []),
        ("%mf_export exported_flow.py", []),
        ('%%step end\nself.result = f"spun: {self.note}"', []),
        ("task = %mf_spin end\ntask.successful, task['result'].data, spun is task", []),
        # Step by step: a join spun on the last run's inputs, then the step after it on the join's spun values.
        ("%%step join --join --next end\nself.total = inputs.gather.total * 100\nself.note = inputs.other.note", []),
        ("joined = %mf_spin join\njoined['total'].data", []),
        ('%%step end\nself.result = f"{self.note}: {self.total}"', []),
        ("chained = %mf_spin end\nchained['result'].data", []),
        ("%%step nowhere --next missing_step\npass", []),
        ("%mf_run", []),
    ]
    notebook = _notebook(cells)
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", allow_errors=True, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    out = [_outputs(cell) for cell in notebook.cells]
    run_cell = len(FLOW_CELLS) + 1
    assert "(True, 'alpha 2.0: 28.0')" in out[run_cell], out[run_cell]  # (1 + 4 + 9) * 2
    assert "28.0" in out[run_cell + 1]
    broken_step, broken_run = notebook.cells[run_cell + 2], run_cell + 3
    each_step = notebook.cells[5]
    # Each failure named by the cell (as the notebook numbers it) and line its code came from: the retried
    # item's first attempt, and the broken end step.
    assert f"failed at In [{each_step.execution_count}], line 3" in out[broken_run], out[broken_run]
    assert f"failed at In [{broken_step.execution_count}], line 2" in out[broken_run], out[broken_run]
    assert out[broken_run].rstrip().endswith("False")
    assert "(True, 'alpha 2.0: 28.0', True)" in out[run_cell + 5], out[run_cell + 5]
    assert "wrote exported_flow.py" in out[run_cell + 6]
    assert "(True, 'spun: alpha 2.0', True)" in out[run_cell + 8], out[run_cell + 8]
    assert "2800.0" in out[run_cell + 10], out[run_cell + 10]
    assert "end takes join's values from its spin: total" in out[run_cell + 12], out[run_cell + 12]
    assert "'alpha 2.0: 2800.0'" in out[run_cell + 12], out[run_cell + 12]
    assert "step 'missing_step' is not declared" in out[-1] and "Traceback" not in out[-1]
    assert set(Path(tempfile.gettempdir()).glob("mf-notebook-*")) == leftovers  # nothing left behind

    exported = tmp_path / "exported_flow.py"
    done = subprocess.run(
        [sys.executable, str(exported), "run", "--alpha", "2"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    check = (
        "import json, sys\nfrom metaflow import Flow, namespace\nnamespace(None)\n"
        "runs = list(Flow('TrainFlow'))\nprint(json.dumps([[r.id, r.successful and r.data.result] for r in runs]))"
    )
    listed = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    results = {result for _, result in json.loads(listed.stdout.strip().splitlines()[-1]) if result}
    assert results == {"alpha 2.0: 28.0"}  # the notebook's runs and the exported file's: the same values


def test_export_from_magics_and_from_tags_writes_the_same_flow(tmp_path: Path) -> None:
    by_magic, by_tag = tmp_path / "magic.ipynb", tmp_path / "tags.ipynb"
    nbformat.write(_notebook([("import this_is_exploration", []), *FLOW_CELLS]), by_magic)
    nbformat.write(_notebook(_tagged(FLOW_CELLS)), by_tag)
    written = []
    for source in (by_magic, by_tag):
        target = tmp_path / f"{source.stem}_flow.py"
        done = run_cli("notebook", "export", str(source), "-o", str(target))
        assert done.returncode == 0, done.stderr
        written.append(target.read_text())
    assert written[0] == written[1]
    assert "this_is_exploration" not in written[0] and "%%" not in written[0]
    assert "    @retry(times=1)\n    @step\n    def each(self):" in written[0]

    checked = run_cli("notebook", "export", str(by_magic), "-o", str(tmp_path / "checked.py"), "--check")
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert checked.stdout.strip().splitlines()[-1].startswith("TrainFlow/")


def test_import_turns_a_flow_file_into_a_notebook_that_runs_and_exports_it_back(tmp_path: Path) -> None:
    nbformat.write(_notebook(FLOW_CELLS), tmp_path / "magic.ipynb")
    exported = tmp_path / "exported.py"
    assert run_cli("notebook", "export", str(tmp_path / "magic.ipynb"), "-o", str(exported)).returncode == 0
    imported = tmp_path / "imported.ipynb"
    done = run_cli("notebook", "import", str(exported), "-o", str(imported))
    assert done.returncode == 0, done.stderr
    again = tmp_path / "again.py"
    assert run_cli("notebook", "export", str(imported), "-o", str(again)).returncode == 0
    assert again.read_text() == exported.read_text()  # the way back and forth loses nothing

    notebook = nbformat.read(imported, as_version=4)
    assert notebook.cells[1].source == "%load_ext metaflow_stack.notebook"
    assert notebook.cells[5].source.startswith('%%step each --decorator "retry(times=1)" --next gather\n')
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert "'alpha 0.5: 7.0'" in _outputs(notebook.cells[-1]) or "successful" in _outputs(notebook.cells[-1])
    check = "from metaflow import Flow, namespace\nnamespace(None)\nprint(Flow('TrainFlow').latest_run.data.result)"
    listed = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert listed.stdout.strip().splitlines()[-1] == "alpha 0.5: 7.0"  # (1 + 4 + 9) * 0.5

    odd = tmp_path / "odd_flow.py"
    odd.write_text(
        exported.read_text().replace(
            "    @step\n    def start", "    def helper(self):\n        pass\n\n    @step\n    def start"
        )
    )
    refused = run_cli("notebook", "import", str(odd), "-o", str(tmp_path / "odd.ipynb"))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "the flow's method helper is not a step or a parameter" in refused.stderr
    assert not (tmp_path / "odd.ipynb").exists()


HAND_WRITTEN = '''"""A flow written by hand, not by export."""

from __future__ import annotations

import functools

# the query the start step runs (kept as written)
from metaflow import FlowSpec, Parameter, step


def timed(function):
    """A decorator of the user's own (not Metaflow's)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)

    return wrapper


class HandFlow(FlowSpec):
    """Counts rows."""

    rows = Parameter("rows", default=3)

    @timed
    @step
    def start(self):
        # a comment before the first statement
        self.query = """
SELECT *
    FROM t
"""
        self.items = list(range(self.rows))
        # a comment before the next
        self.next(self.count, foreach="items")

    @step
    def count(self):
        self.value = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    HandFlow()
'''


def test_a_hand_written_flow_imports_keeps_its_comments_and_strings_and_runs_the_same(tmp_path: Path) -> None:
    original = tmp_path / "hand_flow.py"
    original.write_text(HAND_WRITTEN)
    notebook_path = tmp_path / "hand.ipynb"
    done = run_cli("notebook", "import", str(original), "-o", str(notebook_path))
    assert done.returncode == 0, done.stderr
    cells = [cell.source for cell in nbformat.read(notebook_path, as_version=4).cells]
    assert cells[0] == "# HandFlow\n\nA flow written by hand, not by export.\n\nCounts rows."
    assert cells[2].startswith('%%flow HandFlow --param "rows=3"\nfrom __future__ import annotations')
    assert "# the query the start step runs (kept as written)" in cells[2] and "def timed(function):" in cells[2]
    start = cells[3]
    assert start.startswith('%%step start --decorator "timed" --next count --foreach items\n# a comment before')
    assert '"""\nSELECT *\n    FROM t\n"""' in start and start.endswith("# a comment before the next")
    exported = tmp_path / "exported.py"
    assert run_cli("notebook", "export", str(notebook_path), "-o", str(exported)).returncode == 0
    text = exported.read_text()
    assert text.startswith("from __future__ import annotations\n") and "import timed" not in text
    assert '        self.query = """\nSELECT *\n    FROM t\n"""' in text
    totals = []
    for path in (original, exported):
        ran = subprocess.run([sys.executable, str(path), "run"], cwd=tmp_path, capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr[-3000:]
        check = "from metaflow import Flow, namespace\nnamespace(None)\nprint(Flow('HandFlow').latest_run.data.total)"
        listed = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True)
        totals.append(listed.stdout.strip().splitlines()[-1])
    assert totals == ["6", "6"]  # (0 + 1 + 2) * 2, from the file and from its notebook's export


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (('Parameter("rows", default=3)', 'Parameter("rows", default=3, help="how many")'), "parameter rows has help="),
        (('Parameter("rows", default=3)', 'Parameter("rows", default=10**6)'), "default 10 ** 6 is not a literal"),
        (('Parameter("rows", default=3)', 'Parameter("rows", default={[1]: 2})'), "default {[1]: 2} is not a literal"),
        (("def join(self, inputs):", "def join(self, inp):"), "step join takes (self, inp)"),
        (("class HandFlow(FlowSpec):", "class HandFlow(FlowSpec, dict):"), "has other bases or keywords"),
        (('if __name__ == "__main__":', 'print("after")\nif __name__ == "__main__":'), "module code below class"),
        (("    @step\n    def end", "    limit = 3\n\n    @step\n    def end"), "the flow's attribute limit is not"),
    ],
)
def test_what_a_notebook_cannot_declare_is_refused_in_one_line(tmp_path: Path, change: tuple[str, str], says: str):
    flow = tmp_path / "hand_flow.py"
    flow.write_text(HAND_WRITTEN.replace(*change))
    refused = run_cli("notebook", "import", str(flow), "-o", str(tmp_path / "hand.ipynb"))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert says in refused.stderr, refused.stderr


def test_a_value_that_is_no_literal_and_a_home_relative_export_in_a_kernel(tmp_path: Path, monkeypatch) -> None:
    """``{[1]: 2}`` parses but builds no value (``TypeError``): a default or a run's value is then text, and
    what fails is one line; ``~`` in ``%mf_export`` is the home folder, as in a shell."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    notebook = nbformat.v4.new_notebook()
    sources = [
        "%load_ext metaflow_stack.notebook",
        "%%flow OddFlow --param 'x={[1]: 2}'\nimport os",
        "%%step start --next end\nself.y = 1",
        "%step end",
        "%mf_run nope={[1]:2}",  # (no such parameter: Metaflow refuses it before any run)
        "%mf_export ~/flows/odd_flow.py",
    ]
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    where = {"metadata": {"path": str(tmp_path)}}
    NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=True, resources=where).execute()
    out = [_outputs(cell) for cell in notebook.cells]
    assert not any(o.output_type == "error" for cell in notebook.cells for o in cell.outputs), out  # no traceback
    assert "flow OddFlow (parameters: x)" in out[1]
    assert "UsageError" in out[4] and "nope" in out[4], out[4]
    assert 'x = Parameter("x", default="{[1]: 2}")' in (home / "flows" / "odd_flow.py").read_text()
    assert not (tmp_path / "~").exists()


def test_export_and_import_refuse_to_write_over_the_file_they_read(tmp_path: Path) -> None:
    notebook, flow = tmp_path / "train.ipynb", tmp_path / "train_flow.py"
    nbformat.write(_notebook(FLOW_CELLS), notebook)
    assert run_cli("notebook", "export", str(notebook), "-o", str(flow)).returncode == 0
    kept = notebook.read_bytes(), flow.read_bytes()
    (tmp_path / "link.py").symlink_to(flow)
    for refused in (
        run_cli("notebook", "export", str(notebook), "-o", str(tmp_path / "." / "train.ipynb")),
        run_cli("notebook", "import", str(flow), "-o", str(tmp_path / "link.py")),
    ):
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "is the file being read" in refused.stderr and "name another file to write" in refused.stderr
    assert (notebook.read_bytes(), flow.read_bytes()) == kept
