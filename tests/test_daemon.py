"""A background process of the local stack counts as ours only while its pid file's record holds for it: a
PID given to another process since is never signalled, two ``up``s at once start one process, and what it
writes is its owner's alone. The daemon here is the real one ``just up --with redis`` starts."""

from __future__ import annotations

import multiprocessing
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import free_port, need

from metaflow_stack.daemon import Daemon
from metaflow_stack.errors import StackError
from metaflow_stack.pool.local_redis import LocalRedis


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process of this user that the stack did not start."""
    process = subprocess.Popen(["sleep", "300"])
    yield process
    process.kill()
    process.wait()


@pytest.fixture
def redis_server() -> None:
    need("redis-server", shutil.which("redis-server") is not None, "the pools' Redis (apt-get install redis-server)")


@pytest.mark.usefixtures("redis_server")
def test_a_pid_the_system_gave_another_process_since_is_not_signalled(tmp_path: Path) -> None:
    """What a crashed daemon (or a reboot) leaves: a pid file whose PID now names a process started later."""
    local = LocalRedis(home=tmp_path, port=free_port())
    local.start()
    crashed = psutil.Process(local.daemon.pid())
    crashed.kill()
    crashed.wait(10)
    time.sleep(1.5)  # (the system's start times are read to about a second)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        local.daemon.pidfile.write_text(local.daemon.pidfile.read_text().replace(str(crashed.pid), str(bystander.pid)))
        assert local.daemon.pid() is None
        assert local.stop() is False
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_pid_file_of_an_older_release_names_no_process_to_signal(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    """A bare PID says nothing of which process it was: the safe reading is none of ours."""
    daemon = Daemon(tmp_path, "redis")
    daemon.pidfile.write_text(str(bystander.pid))
    assert daemon.pid() is None
    assert daemon.stop() is False
    assert bystander.poll() is None


class _Listener:
    """Something else on a port: accepts connections and keeps every byte it is sent."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.received = b""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(2)
                try:
                    while chunk := connection.recv(4096):
                        self.received += chunk
                except OSError:
                    pass


@pytest.mark.usefixtures("redis_server")
def test_a_port_something_else_listens_on_is_refused_and_sent_no_password(tmp_path: Path) -> None:
    listener = _Listener()
    local = LocalRedis(home=tmp_path, port=listener.port)
    try:
        with pytest.raises(StackError) as refused:
            local.start()
    finally:
        listener.socket.close()
    assert refused.value.message == f"port {listener.port} is in use by something else"
    assert "METAFLOW_STACK_REDIS_PORT" in (refused.value.fix or "")
    assert listener.received == b"", "asked nothing, least of all with the password"


def _start(home: Path, port: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    local = LocalRedis(home=home, port=port)
    barrier.wait()
    local.start()


@pytest.mark.usefixtures("redis_server")
def test_two_ups_at_once_start_one_redis_that_down_stops(tmp_path: Path) -> None:
    port = free_port()
    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(2)
    ups = [fork.Process(target=_start, args=(tmp_path, port, barrier)) for _ in range(2)]
    for up in ups:
        up.start()
    for up in ups:
        up.join(timeout=60)
    local = LocalRedis(home=tmp_path, port=port)
    try:
        assert [up.exitcode for up in ups] == [0, 0]
        assert (tmp_path / "redis.log").read_text().count("Redis is starting") == 1
        assert local.daemon.pid() is not None
    finally:
        assert local.stop()
    assert not any(
        f"127.0.0.1:{port}" in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])
    ), "down stopped the one that runs"


@pytest.mark.usefixtures("redis_server")
def test_a_daemons_files_are_its_owners_alone_even_where_a_file_was_readable(tmp_path: Path) -> None:
    """The config holds the password: one left readable by an older release is replaced, not reused."""
    (tmp_path / "redis.conf").write_text("")
    (tmp_path / "redis.conf").chmod(0o644)
    local = LocalRedis(home=tmp_path, port=free_port())
    local.start()
    try:
        for name in ("redis.conf", "redis.log", "redis.pid", "redis.lock"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    finally:
        assert local.stop()


@pytest.mark.usefixtures("redis_server")
def test_ours_running_with_other_settings_is_named_not_taken_for_the_one_asked(tmp_path: Path) -> None:
    """`up --redis-port` B while this folder's Redis runs on A: the export line would name B, which no one
    serves."""
    first = LocalRedis(home=tmp_path, port=free_port())
    first.start()
    try:
        with pytest.raises(StackError) as refused:
            LocalRedis(home=tmp_path, port=free_port()).start()
        assert "runs already, with other settings" in refused.value.message
        assert "metaflow stack down" in (refused.value.fix or "")
    finally:
        assert first.stop()
