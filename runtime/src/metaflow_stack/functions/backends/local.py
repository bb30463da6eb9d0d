"""Run the function in persistent worker processes, in its captured environment.

The environment is recreated once (uv, cached by digest). Each worker loads
the function and its model once, then serves calls over a pair of pipes; the
caller blocks in the kernel while a worker computes, so it burns no CPU
waiting. Any thread may call: a call takes an idle worker from a queue, so N
workers serve N calls at once. A worker that dies fails only the call in
flight with ``WorkerCrashedError`` and is restarted by the next call; so is
one that outlasts ``call_timeout`` per input (``CallTimeoutError``), which is
killed with every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from metaflow_stack.functions import codecs, environment, protocol
from metaflow_stack.functions.backends import call_bound
from metaflow_stack.functions.errors import CallTimeoutError, FunctionError, WorkerCrashedError
from metaflow_stack.functions.reference import FunctionReference


class _Worker:
    def __init__(
        self, where: environment.Interpreter, reference_file: Path, base: str | None, codec: str, preload: bool
    ) -> None:
        module = "metaflow_stack.functions.worker"
        self._command = [
            str(where.python),
            "-u",
            "-m",
            module,
            str(reference_file),
            base or "",
            codec,
            str(int(preload)),
        ]
        self._env = where.env()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # A process group of its own, so what the function starts (a DataLoader's workers, say) is stopped with it.
        self._process = subprocess.Popen(
            self._command, env=self._env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, process_group=0
        )
        # Waits for an answer to begin; poll, not select, as a server may hold more than 1,024 descriptors.
        self._answer = select.poll()
        self._answer.register(self._process.stdout, select.POLLIN)
        kind, payload = self._receive()
        if kind == protocol.LOAD_FAILED:
            error = json.loads(payload)
            self.stop()
            raise FunctionError(
                f"the function failed to load in its environment: {error['type']}: {error['message']}\n"
                f"{error['traceback']}"
            )

    def _receive(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The worker's next frame; its first byte within ``timeout`` seconds, or the worker is killed."""
        assert self._process is not None and self._process.stdout is not None
        if timeout is not None and not self._answer.poll(timeout * 1000):
            self._discard()
            raise CallTimeoutError(timeout, "worker process")
        try:
            return protocol.read_frame(self._process.stdout)
        except protocol.ChannelClosed:
            raise WorkerCrashedError(
                f"the function's worker process exited with code {self._discard()} during the call",
                fix="the next call starts a new worker; check the function for crashes (stderr shows its output)",
            ) from None

    def request(self, kind: int, payload: bytes, timeout: float | None = None) -> bytes:
        if self._process is None or self._process.poll() is not None:
            self.start()
        assert self._process is not None and self._process.stdin is not None
        try:
            protocol.write_frame(self._process.stdin, kind, payload)
        except BrokenPipeError:
            self._discard()
            raise WorkerCrashedError("the function's worker process was gone when the call was sent") from None
        try:
            status, body = self._receive(timeout)
        except (CallTimeoutError, WorkerCrashedError):
            raise
        except BaseException:  # (the call may still run: its answer must never reach the next call)
            if self._process is not None:
                self._discard()
            raise
        if status == protocol.RAISED:
            raise protocol.remote_error(body)
        return body

    def _discard(self) -> int:
        """Kill the worker (a no-op when it has exited) and close its pipes; its exit code."""
        assert self._process is not None
        process, self._process = self._process, None
        with contextlib.suppress(ProcessLookupError):  # (the group is gone: the worker and all it started)
            os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()
        return code

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def stop(self) -> None:
        if self._process is not None:
            for stream in (self._process.stdin, self._process.stdout):
                if stream is not None:
                    stream.close()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


class LocalBackend:
    """A pool of worker processes in the function's environment."""

    name = "local"
    in_process = False

    def __init__(
        self,
        reference: FunctionReference,
        base: str | None,
        codec: str,
        workers: int = 1,
        console: Console | None = None,
        preload: bool = False,
        call_timeout: float | None = None,
    ) -> None:
        if workers < 1:
            raise FunctionError(f"workers must be at least 1, not {workers}")
        self._timeout = call_timeout
        where = environment.interpreter(reference.environment, console)
        self._dir = tempfile.TemporaryDirectory(prefix="stack-fn-")
        reference_file = Path(self._dir.name) / "reference.json"
        reference_file.write_text(reference.to_json())
        self._in = codecs.create(codec, reference.input_schema)
        self._out = codecs.create(codec, reference.output_schema)
        self._workers = [_Worker(where, reference_file, base, codec, preload) for _ in range(workers)]
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        errors: list[BaseException] = []
        starters = [threading.Thread(target=_capturing(w.start, errors)) for w in self._workers]
        for starter in starters:  # workers load in parallel
            starter.start()
        for starter in starters:
            starter.join()
        if errors:
            self.close()
            raise errors[0]
        for worker in self._workers:
            self._idle.put(worker)

    def _roundtrip(self, kind: int, payload: bytes, inputs: int = 1) -> bytes:
        worker = self._idle.get()  # (the bound starts once a worker has the call: time queued is not counted)
        try:
            return worker.request(kind, payload, call_bound(self._timeout, inputs))
        finally:
            self._idle.put(worker)

    def call(self, value: Any) -> Any:
        return self._out.decode(self._roundtrip(protocol.CALL, self._in.encode(value)))

    def call_batch(self, values: list[Any]) -> list[Any]:
        return self._out.decode_batch(self._roundtrip(protocol.BATCH, self._in.encode_batch(values), len(values)))

    @property
    def worker_pids(self) -> list[int | None]:
        return [w.pid for w in self._workers]

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._dir.cleanup()


def _capturing(start: Callable[[], None], errors: list[BaseException]) -> Callable[[], None]:
    """``start``, recording its exception instead of losing it in a thread."""

    def run() -> None:
        try:
            start()
        except BaseException as exc:
            errors.append(exc)

    return run
