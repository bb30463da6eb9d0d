"""One Markdown report of many backends' outcomes: a test x backend table, then every failure with its way in.

A failure says which backend, the first lines of its error, and where to
look next: the failed run's page in the UI and the ``metaflow agent
failures`` command that lists its failed tasks with their exceptions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from urllib.parse import quote

from metaflow_stack.ci.results import Outcome, Status

_MARK: dict[Status, str] = {"passed": "✅", "failed": "❌", "skipped": "⏭️"}
_SEVERITY: tuple[Status, ...] = ("skipped", "passed", "failed")
#: Lines of an error shown with a failure; the whole text goes to the check run's raw details.
ERROR_LINES = 6


def backends(outcomes: Iterable[Outcome]) -> list[str]:
    """The backends, in the order they first appear."""
    return list(dict.fromkeys(o.backend for o in outcomes))


def first_lines(text: str, count: int = ERROR_LINES) -> str:
    """The first ``count`` non-blank lines of ``text``."""
    return "\n".join([line for line in text.splitlines() if line.strip()][:count])


def run_links(outcome: Outcome, ui_url: str | None) -> list[str]:
    """Where to look into a failure's run: its UI page and the agent command (none when no run was recorded)."""
    if not outcome.run:
        return []
    links = []
    if ui_url:
        links.append(f"{ui_url.rstrip('/')}/{quote(outcome.run, safe='/')}")
    links.append(f"metaflow agent failures {outcome.run}")
    return links


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _fenced(text: str) -> str:
    fence = "`" * max(3, max((len(run) for run in text.split("\n") if set(run) == {"`"}), default=0) + 1)
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
    lines = ["| test | " + " | ".join(_cell(b) for b in columns) + " |", "|---|" + "---|" * len(columns)]
    for test in dict.fromkeys(o.test for o in outcomes):
        row = [_MARK[cells[(test, b)]] if (test, b) in cells else "-" for b in columns]
        lines.append(f"| {_cell(test)} | " + " | ".join(row) + " |")
    per_backend = [f"**{_cell(b)}**: {counts([o for o in outcomes if o.backend == b])}" for b in columns]
    return "\n".join([*lines, "", " · ".join(per_backend)])


def failure_section(outcome: Outcome, ui_url: str | None) -> str:
    """One failure: where, the first lines of its error, and the way into its run."""
    where = f" (`{outcome.path}:{outcome.line or 1}`)" if outcome.path else ""
    parts = [f"### ❌ `{outcome.test}` on {outcome.backend}{where}"]
    error = first_lines(outcome.message + "\n" + outcome.details)
    if error:
        parts.append(_fenced(error))
    for link in run_links(outcome, ui_url):
        parts.append(f"- {link}" if link.startswith("http") else f"- `{link}`")
    return "\n\n".join(parts)


def markdown(outcomes: Sequence[Outcome], ui_url: str | None = None, title: str = "Flow tests") -> str:
    """The whole report."""
    failed = [o for o in outcomes if o.status == "failed"]
    parts = [f"## {title}: {counts(outcomes)} on {len(backends(outcomes))} backend(s)", table(outcomes)]
    if failed:
        parts.append("## Failures")
        parts += [failure_section(o, ui_url) for o in failed]
    return "\n\n".join(parts) + "\n"
