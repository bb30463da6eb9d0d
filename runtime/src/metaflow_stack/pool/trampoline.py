"""The per-task process Metaflow's runtime starts for a pooled task: hands the task to a warm pool.

Run as ``python -I -S trampoline.py ADDRESS PYTHON FLOW_FILE ARGS...`` (the
task's own command line after the address): it imports nothing but the
standard library, so it starts in milliseconds instead of the 0.4 s a task
process spends importing Metaflow. It passes its own stdout and stderr to
the pool (``SCM_RIGHTS``), so the task writes straight into the pipes the
runtime reads and logs exactly as a task it started itself; then it waits
for the task's exit status and ends with it (a task killed by a signal ends
this process by the same signal). If this process is killed, the pool sees
its connection close and kills the task.

Standard library only, and no imports from this package: ``-S`` leaves
site-packages off the path.
"""

import json
import os
import signal
import socket
import struct
import sys

#: Exit status when the pool is gone before the task ended: a failed attempt, which ``@retry`` retries.
POOL_LOST = 75
#: Bytes of a request's length prefix (big-endian).
HEADER = struct.Struct(">I")


def main(argv: list[str]) -> int:
    address, command = argv[0], argv[1:]
    request = json.dumps({"argv": command, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(address)
        socket.send_fds(connection, [HEADER.pack(len(request)) + request], [1, 2])
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = connection.recv(4096)
            if not chunk:
                break
            reply += chunk
    except OSError as exc:
        print(f"worker pool at {address} unreachable: {exc}", file=sys.stderr)
        return POOL_LOST
    if not reply.endswith(b"\n"):
        print("worker pool stopped before the task ended", file=sys.stderr)
        return POOL_LOST
    status = json.loads(reply)
    if status.get("signal"):
        signal.signal(status["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), status["signal"])
    return int(status["code"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
