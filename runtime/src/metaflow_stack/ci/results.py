"""Test outcomes read from JUnit files, each with its backend and, where the plugin recorded them, its run.

The plugin writes what a report needs into each test case's JUnit
properties (the ``PROPERTY_*`` names), so results from many jobs need
nothing but their files to be merged: the backend, the test's id without
the backend, the flow run it started and where in the flow file its failed
step is. A case without them (another pytest run's file) still counts: its
backend is the one named with the file, or the file's name.

A JUnit file is read as untrusted input (it may come from any job, a fork's
included): a file with a document type declaration is refused before any of
it is expanded, since Python's XML parser expands the entities one declares
(a few megabytes of references grow to gigabytes) and JUnit has no use for
one.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from metaflow_stack.deploy import require
from metaflow_stack.errors import InvalidInput

PROPERTY_BACKEND = "metaflow_backend"
PROPERTY_TEST = "metaflow_test"
PROPERTY_RUN = "metaflow_run"
PROPERTY_FLOW_FILE = "metaflow_flow_file"
PROPERTY_FLOW_LINE = "metaflow_flow_line"

Status = Literal["passed", "failed", "skipped"]
#: A JUnit file larger than this is refused: a report reads every file whole.
MAX_FILE_BYTES = 64 * 1024 * 1024
#: A part of a dotted module name as test runners write a case's class name (``tests.test_x.TestY``).
_MODULE_PART = re.compile(r"[\w-]+")


@dataclass(frozen=True)
class Outcome:
    """One test on one backend."""

    test: str
    backend: str
    status: Status
    #: The failure's or skip's message (its first line is the reason), empty when it passed.
    message: str = ""
    #: The failure's whole text (the traceback).
    details: str = ""
    #: The flow run the test started, as a pathspec (``Flow/run``).
    run: str | None = None
    #: Where to point at: the flow file (else the test file), relative to the repository, and a line in it.
    path: str | None = None
    line: int | None = None


def _properties(case: object) -> dict[str, str]:
    from junitparser import Properties

    found = case.child(Properties)  # type: ignore[attr-defined]
    return {p.name: p.value for p in found} if found is not None else {}


def _add_property(junitparser: Any, case: Any, name: str, value: str) -> None:
    found = case.child(junitparser.Properties)
    if found is None:
        found = junitparser.Properties()
        case.append(found)
    found.add_property(junitparser.Property(name, value))


def _outcome(case: object, backend: str) -> Outcome:
    from junitparser import Error, Failure, Skipped

    props = _properties(case)
    results = list(case.result)  # type: ignore[attr-defined]
    problem = next((r for r in results if isinstance(r, (Failure, Error))), None)
    skipped = next((r for r in results if isinstance(r, Skipped)), None)
    status: Status = "failed" if problem is not None else "skipped" if skipped is not None else "passed"
    reason = problem if problem is not None else skipped
    line = props.get(PROPERTY_FLOW_LINE, "")
    named = f"{case.classname or ''}.{case.name or ''}".strip(".")  # type: ignore[attr-defined]
    return Outcome(
        test=props.get(PROPERTY_TEST) or named,
        backend=props.get(PROPERTY_BACKEND) or backend,
        status=status,
        message=(reason.message or "") if reason is not None else "",
        details=(reason.text or "") if reason is not None else "",
        run=props.get(PROPERTY_RUN) or None,
        path=props.get(PROPERTY_FLOW_FILE) or _test_file(case.classname),  # type: ignore[attr-defined]
        line=int(line) if line.isdecimal() and line.isascii() and int(line) > 0 else None,
    )


def _test_file(classname: str | None) -> str | None:
    """The test module a case without a flow file came from (``tests.test_x`` or ``tests.test_x.TestY``:
    ``tests/test_x.py``), when that file is here: the report runs in the repository's root."""
    parts = (classname or "").split(".")
    if not all(_MODULE_PART.fullmatch(part) for part in parts):  # not a module's dotted name: no file to point at
        return None
    for end in range(len(parts), 0, -1):
        candidate = Path(*parts[:end]).with_suffix(".py")
        if candidate.is_file():
            return candidate.as_posix()
    return None


class _Declared(Exception):
    """A document type declaration met while parsing: refused before its entities are read."""


class _Builder(ElementTree.TreeBuilder):
    """The parser's tree builder, less any document type."""

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        # Called as the parser meets ``<!DOCTYPE``, before the internal subset (where entities are declared).
        raise _Declared


def _load(junitparser: Any, path: Path) -> Any:
    """``path``'s JUnit XML; one line naming the file when it cannot be read, is too big, declares a document
    type or is not JUnit XML."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidInput(
            str(path), f"cannot be read: {exc.strerror}", fix="name JUnit XML files that exist"
        ) from None
    if size > MAX_FILE_BYTES:
        raise InvalidInput(str(path), f"is {size} bytes, over {MAX_FILE_BYTES}", fix="split the test run's report")
    fix = "pass the files pytest wrote with --junit-xml"
    try:
        root = ElementTree.parse(path, ElementTree.XMLParser(target=_Builder())).getroot()
        return junitparser.JUnitXml.fromroot(root)
    except _Declared:
        raise InvalidInput(str(path), "declares a document type (<!DOCTYPE>), which JUnit XML never has", fix) from None
    except (ElementTree.ParseError, junitparser.JUnitXmlError, OSError, LookupError, ValueError) as exc:
        # LookupError: an encoding Python does not know; ValueError: bytes that are not of the encoding named
        raise InvalidInput(str(path), f"is not JUnit XML: {exc}", fix) from None


def read(paths: Iterable[Path], backend: str | None = None) -> list[Outcome]:
    """Every test case of ``paths``; cases that name no backend get ``backend``, else their file's name."""
    junitparser = require("junitparser", extra="ci")
    outcomes: list[Outcome] = []
    for path in paths:
        xml = _load(junitparser, path)
        suites = [xml] if isinstance(xml, junitparser.TestSuite) else list(xml)
        for suite in suites:
            outcomes += [_outcome(case, backend or path.stem) for case in suite]
    return outcomes


def merge(paths: Iterable[Path], out: Path, backend: str | None = None) -> Path:
    """One JUnit file holding every suite of ``paths`` (for tools that take one); a case that names no
    backend gets the one ``read`` gives it (``backend``, else its file's name), so the merged file keeps it."""
    junitparser = require("junitparser", extra="ci")
    merged = junitparser.JUnitXml()
    for path in paths:
        xml = _load(junitparser, path)
        for suite in [xml] if isinstance(xml, junitparser.TestSuite) else list(xml):
            for case in suite:
                if PROPERTY_BACKEND not in _properties(case):
                    _add_property(junitparser, case, PROPERTY_BACKEND, backend or path.stem)
        merged += xml
    out.parent.mkdir(parents=True, exist_ok=True)
    merged.write(str(out))
    return out
