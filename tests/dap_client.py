"""A Debug Adapter Protocol client that drives debugpy's adapter as VS Code's Python Debugger does.

VS Code cannot reach its extension marketplace from these machines, so the
editor's "Debug step" is tested one layer down: the configuration the
extension generates is sent, as it is, in a ``launch`` request to debugpy's
own adapter (``python -m debugpy.adapter``), and this client does what the
editor does with the adapter's requests: it starts the program for
``runInTerminal`` and, for each ``debugpyAttach`` (a subprocess to follow),
connects to the adapter again and attaches. Messages follow the DAP base
protocol (a ``Content-Length`` header, then JSON).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

#: Seconds any one answer or event may take (a spin imports Metaflow and the flow).
WAIT_S = 120


class Channel:
    """One DAP connection: requests out, responses and events in (read on a thread of its own)."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO, on_request: Callable[[Channel, dict], None]) -> None:
        self.reader, self.writer, self.on_request = reader, writer, on_request
        self.seq = 0
        self.responses: dict[int, queue.Queue] = {}
        self.events: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def send(self, message: dict[str, Any]) -> int:
        with self.lock:
            self.seq += 1
            message = {**message, "seq": self.seq}
            body = json.dumps(message).encode()
            self.writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            self.writer.flush()
            return self.seq

    def request(self, command: str, arguments: dict[str, Any] | None = None, wait: bool = True) -> dict | None:
        waiting: queue.Queue = queue.Queue()
        with self.lock:
            expected = self.seq + 1
            self.responses[expected] = waiting
        sent = self.send({"type": "request", "command": command, "arguments": arguments or {}})
        assert sent == expected
        if not wait:
            return None
        response = waiting.get(timeout=WAIT_S)
        assert response["success"], f"{command}: {response.get('message')} {response.get('body')}"
        return response

    def event(self, name: str) -> dict:
        """The next event called ``name`` (others before it are dropped)."""
        while True:
            found = self.events.get(timeout=WAIT_S)
            if found["event"] == name:
                return found

    def _read(self) -> None:
        while True:
            headers = {}
            while (line := self.reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                headers[key.strip().lower()] = value.strip()
            if not headers:
                return
            message = json.loads(self.reader.read(int(headers["content-length"])))
            if message["type"] == "response":
                self.responses.pop(message["request_seq"]).put(message)
            elif message["type"] == "event":
                self.events.put(message)
            else:
                self.on_request(self, message)


class Debugger:
    """A debug session of ``configuration`` on debugpy's adapter, followed into subprocesses."""

    def __init__(self, configuration: dict[str, Any], env: dict[str, str]) -> None:
        self.configuration, self.env = configuration, env
        self.launched: list[subprocess.Popen] = []
        self.sessions: queue.Queue = queue.Queue()
        self.adapter = subprocess.Popen(
            [configuration.get("python", sys.executable), "-m", "debugpy.adapter"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.main = Channel(self.adapter.stdout, self.adapter.stdin, self._reverse)
        self.stops: queue.Queue = queue.Queue()

    def _initialize(self, channel: Channel) -> None:
        channel.request(
            "initialize",
            {
                "clientID": "metaflow-stack-tests",
                "adapterID": "debugpy",
                "pathFormat": "path",
                "linesStartAt1": True,
                "columnsStartAt1": True,
                "supportsRunInTerminalRequest": True,
            },
        )

    def _reverse(self, channel: Channel, message: dict) -> None:
        """What the editor does for the adapter: start the program in a "terminal"."""
        if message["command"] != "runInTerminal":
            channel.send({"type": "response", "request_seq": message["seq"], "command": message["command"],
                          "success": False, "message": "not supported"})  # fmt: skip
            return
        arguments = message["arguments"]
        env = {**os.environ, **self.env, **{k: v for k, v in (arguments.get("env") or {}).items() if v is not None}}
        process = subprocess.Popen(arguments["args"], cwd=arguments.get("cwd"), env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        self.launched.append(process)
        channel.send({"type": "response", "request_seq": message["seq"], "command": "runInTerminal",
                      "success": True, "body": {"processId": process.pid}})  # fmt: skip

    def stop_at(self, path: str, line: int) -> tuple[Channel, dict]:
        """Launch, with a breakpoint at ``path:line`` in every process; the session and the stack frame
        where the first process stopped."""
        self._initialize(self.main)
        self.main.request("launch", self.configuration, wait=False)
        self.main.event("initialized")
        breakpoints = {"source": {"path": path}, "breakpoints": [{"line": line}]}
        self.main.request("setBreakpoints", breakpoints)
        self.main.request("configurationDone")
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:  # each subprocess: a session of its own, as VS Code opens one
            with contextlib.suppress(queue.Empty):
                return self.stops.get(timeout=0.1)
            with contextlib.suppress(queue.Empty):
                found = self.main.events.get(timeout=0.1)
                if found["event"] == "debugpyAttach":
                    self._attach(found["body"], breakpoints)
                elif found["event"] == "stopped":
                    return self.main, self._top(self.main, found)
                elif found["event"] == "terminated":
                    raise AssertionError("the program ended without stopping at the breakpoint")
        raise AssertionError(f"no process stopped at {path}:{line} in {WAIT_S} s")

    def _attach(self, config: dict[str, Any], breakpoints: dict) -> Channel:
        connect = config["connect"]
        sock = socket.create_connection((connect["host"], connect["port"]), timeout=WAIT_S)
        sock.settimeout(None)
        stream = sock.makefile("rwb", buffering=0)
        channel = Channel(stream, stream, self._reverse)
        self._initialize(channel)
        channel.request("attach", config, wait=False)
        channel.event("initialized")
        channel.request("setBreakpoints", breakpoints)
        channel.request("configurationDone")
        threading.Thread(target=self._watch, args=(channel,), daemon=True).start()
        return channel

    def _watch(self, channel: Channel) -> None:
        """Report where ``channel``'s process stops, if it does before it ends."""
        while True:
            found = channel.events.get()
            if found["event"] == "stopped":
                self.stops.put((channel, self._top(channel, found)))
                return
            if found["event"] in ("terminated", "exited"):
                return

    @staticmethod
    def _top(channel: Channel, stopped: dict) -> dict:
        thread = stopped["body"]["threadId"]
        frames = channel.request("stackTrace", {"threadId": thread, "levels": 1})["body"]["stackFrames"]
        return {**frames[0], "threadId": thread, "reason": stopped["body"]["reason"]}

    def evaluate(self, channel: Channel, frame: dict, expression: str) -> str:
        body = channel.request("evaluate", {"expression": expression, "frameId": frame["id"], "context": "repl"})
        return body["body"]["result"]

    def close(self) -> None:
        for process in self.launched:
            process.kill()
            process.wait()
        self.adapter.kill()
        self.adapter.wait()
