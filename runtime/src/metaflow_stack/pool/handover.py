"""The pool's side of the trampoline's hand-over: one request read from a connection, with the task's
stdout and stderr attached (``trampoline.encode`` writes it)."""

from __future__ import annotations

import os
import socket
import time

from metaflow_stack.pool import trampoline
from metaflow_stack.pool.child import Task

#: The largest request a trampoline may send (its environment holds the input paths of a join).
MAX_REQUEST = 16 << 20
#: A request not whole this long after its connection was taken is dropped: the trampoline sends at once,
#: and the fork server takes nothing else meanwhile (a peer sending a byte now and then held it for good).
RECEIVE_TIMEOUT_S = 5.0


def receive(connection: socket.socket) -> tuple[Task, tuple[int, int]]:
    """The task a trampoline hands over and its two file descriptors; ``ValueError`` for anything else
    (the descriptors closed)."""
    deadline = time.monotonic() + RECEIVE_TIMEOUT_S
    connection.settimeout(RECEIVE_TIMEOUT_S)
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(connection, 65536, 2)
        if len(fds) != 2 or len(data) < 4:
            raise ValueError("a request needs its length, its fields and two file descriptors")
        length = int.from_bytes(data[:4], "big")
        if length > MAX_REQUEST:
            raise ValueError(f"request of {length} bytes over the {MAX_REQUEST} limit")
        body = bytearray(data[4:])
        while len(body) < length:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            connection.settimeout(left)
            chunk = connection.recv(min(1 << 20, length - len(body)))
            if not chunk:
                raise ValueError("request cut short")
            body += chunk
        python, argv, env, cwd = trampoline.decode(bytes(body))
        if len(argv) < 2:
            raise ValueError("a request's command needs an interpreter and a flow file")
    except (OSError, ValueError, UnicodeError, IndexError) as exc:
        for fd in fds:
            os.close(fd)
        why = f"not whole after {RECEIVE_TIMEOUT_S:g}s" if isinstance(exc, TimeoutError) else exc
        raise ValueError(f"unreadable request: {why}") from None
    finally:
        connection.settimeout(None)
    return Task(python, argv, env, cwd), (fds[0], fds[1])
