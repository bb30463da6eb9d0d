"""The per-task process Metaflow's runtime starts for a pooled task: hands the task to a warm pool.

Run as ``python -I -S -c RUN POOL_DIR ADDRESS PEER PYTHON FLOW_FILE ARGS...``
(``local.trampoline_command``: the task's own command line after the pool's
socket and the pid of the process that must be answering on it, 0: any): it
imports only ``posix``, ``_socket`` and ``_signal``, not even ``os``, and
is imported, not run as a script, so that its compiled form is cached; it
starts in about 7.5 ms of CPU (a bare interpreter takes 7) instead of the
0.4 s a task process spends importing Metaflow.
It passes its own stdout and stderr to the pool (``SCM_RIGHTS``), so the
task writes straight into the pipes the runtime reads and logs exactly as a
task it started itself; then it waits for the task's exit status and ends
with it (a task killed by a signal ends this process by the same signal).
If this process is killed, the pool sees its connection close and kills
the task. Where the kernel says who listens on a socket (``SO_PEERCRED``), it
hands nothing to any process but ``PEER``: a socket put in the pool's place
(by a task in a sandboxed pool, whose folder it can write) gets neither the
task's environment nor its output.

A request is ``LENGTH`` (4 bytes, big-endian) and then NUL-separated
fields: the interpreter running this trampoline (the one the runtime meant
the task to run with, whichever decorator chose it), the working folder,
the number of arguments, the arguments, and the environment as
``NAME=VALUE``. The reply is one line, ``CODE SIGNAL``.
No imports from this package: ``-S`` leaves site-packages off the path.
"""

import _signal
import _socket
import posix
import sys

#: Exit status when the pool is gone before the task ended: a failed attempt, which ``@retry`` retries.
POOL_LOST = 75


def _bytes(field: str | bytes) -> bytes:
    """``os.fsencode``, without importing ``os`` (a millisecond of every pooled task's start)."""
    return field if isinstance(field, bytes) else field.encode(sys.getfilesystemencoding(), "surrogateescape")


def encode(python: str, command: list[str], env: dict[str, str] | dict[bytes, bytes], cwd: str | bytes) -> bytes:
    """One request, length first."""
    pairs = (_bytes(name) + b"=" + _bytes(value) for name, value in env.items())
    body = b"\0".join([_bytes(python), _bytes(cwd), str(len(command)).encode(), *map(_bytes, command), *pairs])
    return len(body).to_bytes(4, "big") + body


def decode(body: bytes) -> tuple[str, list[str], dict[str, str], str]:
    """A request's interpreter, command, environment and folder (the pool's side of ``encode``)."""
    fields = [field.decode(sys.getfilesystemencoding(), "surrogateescape") for field in body.split(b"\0")]
    python, cwd, count = fields[0], fields[1], int(fields[2])
    command, pairs = fields[3 : 3 + count], fields[3 + count :]
    if len(command) != count:
        raise ValueError(f"a request names {count} arguments and has {len(command)}")
    return python, command, dict(pair.split("=", 1) for pair in pairs), cwd


def reply(code: int) -> bytes:
    """The pool's answer for a task that exited with ``code`` (negative: killed by that signal)."""
    return f"{code} {-code if code < 0 else 0}\n".encode()


def peer_pid(connection: _socket.socket) -> int | None:
    """The pid of the process at the other end of a Unix socket, where the kernel tells (Linux)."""
    if not hasattr(_socket, "SO_PEERCRED"):
        return None
    credentials = connection.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # pid, uid, gid
    return int.from_bytes(credentials[:4], sys.byteorder)


#: ``forkserver.PASSED_VARIABLE`` (no imports from this package): where set, the names of the only variables a
#: task takes to its pool (a sandbox's, or one on other machines), with itself.
PASSED = b"METAFLOW_STACK_POOL_PASSED"


def passed(env: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """What of ``env`` goes to the pool: all of it, or where ``PASSED`` names some, only those. Left to the
    pool, the rest (this machine's credentials, say) would reach a sandbox's memory (a forked task holds its
    server's heap, the whole request among it) or another machine, which filters it there."""
    names = env.get(PASSED)
    if names is None:
        return env
    kept = {PASSED, *names.split(b",")}
    return {name: value for name, value in env.items() if name in kept}


def main(argv: list[str]) -> int:
    address, peer, command = argv[0], int(argv[1]), argv[2:]
    request = encode(sys.executable, command, passed(posix.environ), posix.getcwdb())
    fds = (1).to_bytes(4, sys.byteorder) + (2).to_bytes(4, sys.byteorder)
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    reply = b""
    try:
        connection.connect(address)
        answering = peer_pid(connection) if peer else None
        if answering is not None and answering != peer:
            print(f"worker pool at {address}: process {answering} answers, not the pool's {peer}", file=sys.stderr)
            return 1
        sent = connection.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if sent < len(request):
            connection.sendall(request[sent:])
        while not reply.endswith(b"\n"):
            chunk = connection.recv(64)
            if not chunk:
                break
            reply += chunk
    except OSError as exc:
        print(f"worker pool at {address} unreachable: {exc}", file=sys.stderr)
        return POOL_LOST
    if not reply.endswith(b"\n"):
        print("worker pool stopped before the task ended", file=sys.stderr)
        return POOL_LOST
    code, signal = (int(part) for part in reply.split())
    if signal:
        if signal not in (_signal.SIGKILL, _signal.SIGSTOP):  # (theirs cannot be set, and is the kernel's)
            _signal.signal(signal, _signal.SIG_DFL)
        posix.kill(posix.getpid(), signal)
    return code
