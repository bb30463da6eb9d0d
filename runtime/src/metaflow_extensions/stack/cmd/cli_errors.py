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
    """Turn a ``StackError`` into a one-line error and its fix."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except StackError as exc:
            _err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
            if exc.fix:
                _err.print(f"[bold]fix:[/] {escape(exc.fix)}", highlight=False)
            sys.exit(1)
        except KeyboardInterrupt:
            _err.print("interrupted")
            sys.exit(130)

    return wrapper


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
