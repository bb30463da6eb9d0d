"""The one way every ``metaflow`` command of this extension reports a user error."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
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
