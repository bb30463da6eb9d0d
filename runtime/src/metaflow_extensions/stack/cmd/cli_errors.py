"""The one way every ``metaflow`` command of this extension reports a user error."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape

from metaflow_stack.errors import StackError

_err = Console(stderr=True)
#: What to do about a path, by what went wrong with it.
_PATH_FIXES = {
    errno.ENOENT: "check that the path is there (a file, a folder or a program on PATH)",
    errno.EACCES: "use a path you may read and write, or change its permissions",
    errno.EPERM: "use a path you may read and write, or change its permissions",
    errno.ENOTDIR: "a folder on that path is a file: name another path, or move the file",
    errno.EEXIST: "a file is where a folder must be made: name another path, or move the file",
    errno.EISDIR: "that path is a folder: name a file",
    errno.ENOSPC: "free some space on that disk",
    errno.EROFS: "that disk is read-only: name a path on another",
}


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
            _say(f"{exc.strerror or exc}: {exc.filename}", _PATH_FIXES.get(exc.errno, "check that path"))
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
