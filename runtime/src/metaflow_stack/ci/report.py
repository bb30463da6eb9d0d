"""One Markdown report of many backends' outcomes: a test x backend table, then every failure with its way in.

A failure says which backend, the first lines of its error, and where to
look next: the failed run's page in the UI and the ``metaflow agent
failures`` command that lists its failed tasks with their exceptions.

Everything a report shows from a JUnit file (test names, backends, paths,
errors) is text from the tests, not Markdown: it is shown as it is, so no
name or error can close a code block, open an HTML comment or add a table
column that hides the failures after it. A report stays within
``MAX_REPORT_BYTES``, under the 1 MiB past which GitHub drops a job summary
whole: failures that do not fit are counted, not shown.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from urllib.parse import quote

from metaflow_stack.ci.results import Outcome, Status

_MARK: dict[Status, str] = {"passed": "✅", "failed": "❌", "skipped": "⏭️"}
_SEVERITY: tuple[Status, ...] = ("skipped", "passed", "failed")
#: Lines of an error shown with a failure; the whole text goes to the check run's raw details.
ERROR_LINES = 6
#: The most characters of one error line shown (a one-line assertion on a big value can be megabytes).
MAX_LINE = 500
#: The most UTF-8 bytes a report may have: GitHub drops a step's summary over 1 MiB.
MAX_REPORT_BYTES = 1_000_000
#: Bytes kept aside for the lines that say what was left out.
_NOTE_ROOM = 1_000
#: Characters that end a line, or have no text of their own, anywhere Markdown would read them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: What would start a tag, comment, entity, code span, escape or table cell, as the character references
#: that show it (Markdown reads them as text in a table cell too).
_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "&#124;", "`": "&#96;", "\\": "&#92;"})
#: The ``]`` that would end a link's text (``[docs](https://...)``, ``[docs][ref]``): a test so named showed as
#: a link to wherever its author chose. A bracket alone (``test_f[0]``) stays as it is.
_LINK_END = re.compile(r"\](?=[(\[])")


def backends(outcomes: Iterable[Outcome]) -> list[str]:
    """The backends, in the order they first appear."""
    return list(dict.fromkeys(o.backend for o in outcomes))


def first_lines(text: str, count: int = ERROR_LINES) -> str:
    """The first ``count`` non-blank lines of ``text``, each cut at ``MAX_LINE`` characters."""
    lines = [line for line in text.splitlines() if line.strip()][:count]
    return "\n".join(
        line if len(line) <= MAX_LINE else f"{line[:MAX_LINE]} … ({len(line) - MAX_LINE} more characters)"
        for line in lines
    )


def run_links(outcome: Outcome, ui_url: str | None) -> list[str]:
    """Where to look into a failure's run: its UI page and the agent command (none when no run was recorded)."""
    if not outcome.run:
        return []
    links = []
    if ui_url:
        links.append(f"{ui_url.rstrip('/')}/{quote(outcome.run, safe='/')}")
    links.append(f"metaflow agent failures {outcome.run}")
    return links


def plain(text: str) -> str:
    """``text`` as one line of Markdown that shows it as it is (in a table cell too)."""
    return _LINK_END.sub("&#93;", _CONTROL.sub(" ", text).translate(_ESCAPES))


def code(text: str) -> str:
    """``text`` as one inline code span, whatever backticks it holds (a code span shows ``<`` as it is)."""
    text = _CONTROL.sub(" ", text)
    fence = "`" * (_longest_backticks(text) + 1)
    # A space inside each end keeps a backtick at an end from joining the fence; Markdown takes the spaces off.
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _longest_backticks(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _fenced(text: str) -> str:
    """A code block no line of ``text`` can close: its fence is longer than any run of backticks in it."""
    fence = "`" * max(3, _longest_backticks(text) + 1)
    return f"{fence}text\n{text}\n{fence}"


def counts(outcomes: Sequence[Outcome]) -> str:
    """``N failed, N passed, N skipped`` (the non-zero ones)."""
    tally = Counter(o.status for o in outcomes)
    parts = [f"{tally[status]} {status}" for status in ("failed", "passed", "skipped") if tally[status]]
    return ", ".join(parts) or "no tests"


def table(outcomes: Sequence[Outcome]) -> str:
    """The test x backend table; a test not run on a backend shows ``-``."""
    columns = backends(outcomes)
    cells: dict[tuple[str, str], Status] = {}
    for o in outcomes:  # a test run twice on one backend (a job run again) shows its worst outcome
        cells[(o.test, o.backend)] = max(cells.get((o.test, o.backend), o.status), o.status, key=_SEVERITY.index)
    lines = ["| test | " + " | ".join(plain(b) for b in columns) + " |", "|---|" + "---|" * len(columns)]
    for test in dict.fromkeys(o.test for o in outcomes):
        row = [_MARK[cells[(test, b)]] if (test, b) in cells else "-" for b in columns]
        lines.append(f"| {plain(test)} | " + " | ".join(row) + " |")
    per_backend = [f"**{plain(b)}**: {counts([o for o in outcomes if o.backend == b])}" for b in columns]
    return "\n".join([*lines, "", " · ".join(per_backend)])


def failure_section(outcome: Outcome, ui_url: str | None) -> str:
    """One failure: where, the first lines of its error, and the way into its run."""
    where = f" ({code(f'{outcome.path}:{outcome.line or 1}')})" if outcome.path else ""
    parts = [f"### ❌ {code(outcome.test)} on {plain(outcome.backend)}{where}"]
    error = first_lines(outcome.message + "\n" + outcome.details)
    if error:
        parts.append(_fenced(error))
    for link in run_links(outcome, ui_url):
        parts.append(f"- {link}" if link.startswith("http") else f"- {code(link)}")
    return "\n\n".join(parts)


def _fitting(blocks: Sequence[str], budget: int, separator: str) -> list[str]:
    """The first of ``blocks`` that fit in ``budget`` UTF-8 bytes, joined by ``separator``."""
    kept: list[str] = []
    for block in blocks:
        budget -= len(block.encode()) + len(separator)
        if budget < 0:
            break
        kept.append(block)
    return kept


def markdown(
    outcomes: Sequence[Outcome], ui_url: str | None = None, title: str = "Flow tests", limit: int = MAX_REPORT_BYTES
) -> str:
    """The whole report, within ``limit`` UTF-8 bytes: the table first, then as many failures as fit."""
    failed = [o for o in outcomes if o.status == "failed"]
    heading = f"## {plain(title)}: {counts(outcomes)} on {len(backends(outcomes))} backend(s)"
    budget = limit - _NOTE_ROOM - len(heading.encode())
    lines = table(outcomes).split("\n")
    rows = _fitting(lines, budget, "\n")
    parts = [heading, "\n".join(rows)]
    if len(rows) < len(lines):
        parts.append(
            f"… {len(lines) - len(rows)} more line(s) of the table left out: the report is cut at {limit} bytes."
        )
    if failed:
        parts.append("## Failures")
        shown = _fitting(
            [failure_section(o, ui_url) for o in failed], budget - len("\n\n".join(parts).encode()), "\n\n"
        )
        parts += shown
        if len(shown) < len(failed):
            parts.append(
                f"{len(failed) - len(shown)} more failure(s) left out: the report is cut at {limit} bytes "
                "(GitHub drops a job summary over 1 MiB). The JUnit files hold every one."
            )
    return "\n\n".join(parts) + "\n"
