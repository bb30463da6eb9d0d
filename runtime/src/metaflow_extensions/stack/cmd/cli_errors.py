"""The one way every ``metaflow`` command of this extension reports a user error."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape

from metaflow_stack.errors import StackError

_err = Console(stderr=True)


def friendly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ``StackError`` into a one-line error and its fix; and so a path that cannot be made, read or
    written (an ``OSError`` naming a file: an output folder under a file, a file with no permission, a state
    folder that is a file), which is the path's, not a bug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StackError as exc:
            _say(exc.message, exc.fix)
            sys.exit(1)
        except OSError as exc:
            if exc.filename is None:  # (a socket's, a process's: not a path's)
                raise
            _say(f"{exc.strerror or exc}: {exc.filename}", "name a path whose folders are folders you may write in")
            sys.exit(1)
        except KeyboardInterrupt:
            _err.print("interrupted")
            sys.exit(130)

    return wrapper


def _say(message: str, fix: str | None) -> None:
    _err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    if fix:
        _err.print(f"[bold]fix:[/] {escape(fix)}", highlight=False)


@contextlib.contextmanager
def errors_as_json(as_json: bool) -> Iterator[None]:
    """With ``--json``, a ``StackError`` is printed as its JSON object (``{"error": ...}``) and the command
    exits 1; without, it goes on to ``friendly``'s one line."""
    try:
        yield
    except StackError as exc:
        if not as_json:
            raise
        print(json.dumps(exc.to_dict()))
        sys.exit(1)
