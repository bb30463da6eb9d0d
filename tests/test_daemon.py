"""A background process of the local stack counts as ours only while its pid file's record holds for it: a
PID given to another process since is never signalled, a clock step leaves ours ours, what an older release's
pid file names is named for the user to stop, an answer counts only once our process listens on the port, two
``up``s at once start one process, and what it writes is its owner's alone. The daemon here is the real one
``just up --with redis`` starts."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import free_port, need

from metaflow_stack.daemon import Daemon, port_taken
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
        record = json.loads(local.daemon.pidfile.read_text())
        local.daemon.pidfile.write_text(json.dumps({**record, "pid": bystander.pid}))
        assert local.daemon.pid() is None
        assert local.stop() is False
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.usefixtures("redis_server")
def test_a_clock_step_leaves_our_daemon_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A laptop or a VM resumed, or ``date`` set by hand, moves the wall-clock start the system reports for
    every process by as much (minutes here); its start counted from the boot does not move."""
    local = LocalRedis(home=tmp_path, port=free_port())
    local.start()
    try:
        pid = local.daemon.pid()
        stepped = psutil.Process.create_time
        monkeypatch.setattr(psutil.Process, "create_time", lambda self: stepped(self) + 300)
        assert local.daemon.pid() == pid
    finally:
        assert local.stop()


@pytest.mark.usefixtures("redis_server")
def test_a_pid_recorded_in_another_boot_is_not_ours(tmp_path: Path) -> None:
    """After a reboot the same PID and the same ticks since the boot can name another process."""
    if not Path("/proc/sys/kernel/random/boot_id").exists():
        pytest.skip("no boot id here (the start is the wall clock's)")
    local = LocalRedis(home=tmp_path, port=free_port())
    local.start()
    process = psutil.Process(local.daemon.pid())
    try:
        record = json.loads(local.daemon.pidfile.read_text())
        record["start"]["boot"] = "00000000-0000-0000-0000-000000000000"
        local.daemon.pidfile.write_text(json.dumps(record))
        assert local.daemon.pid() is None
        assert local.stop() is False and process.is_running()
    finally:
        process.kill()
        process.wait(10)


def test_a_process_an_older_releases_pid_file_names_is_named_not_signalled_nor_forgotten(
    tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    """A bare PID says nothing of which process it was: perhaps that release's daemon, perhaps not."""
    daemon = Daemon(tmp_path, "redis")
    daemon.pidfile.write_text(str(bystander.pid))
    assert daemon.pid() is None
    with pytest.raises(StackError) as refused:
        daemon.stop()
    assert f"perhaps the redis an older release started (pid {bystander.pid}, sleep)" in refused.value.message
    assert f"kill {bystander.pid}" in (refused.value.fix or "") and str(daemon.pidfile) in (refused.value.fix or "")
    assert bystander.poll() is None and daemon.pidfile.read_text() == str(bystander.pid)


@pytest.mark.usefixtures("redis_server")
def test_up_names_the_redis_an_older_release_started_with_its_pid(tmp_path: Path) -> None:
    """Not 'port in use by something else', whose fix (another port) would leave it running for good."""
    port = free_port()
    older = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""], stdout=subprocess.DEVNULL
    )
    try:
        (tmp_path / "redis.pid").write_text(str(older.pid))
        deadline = time.monotonic() + 10
        while not port_taken(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(StackError) as refused:
            LocalRedis(home=tmp_path, port=port).start()
        assert f"perhaps the redis an older release started (pid {older.pid}" in refused.value.message
        assert (refused.value.fix or "").startswith(f"stop it (kill {older.pid}), then run up again")
        assert older.poll() is None
    finally:
        older.kill()
        older.wait()


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


def test_what_takes_the_port_before_our_daemon_binds_it_is_refused_and_asked_nothing(tmp_path: Path) -> None:
    """Between `up`'s look at the port and its daemon's bind, another user's program takes the port: answering
    there while our process lives does not make it ours (the question would carry the key or password)."""
    port = free_port()
    binds_late = f"import socket, time; time.sleep(3); socket.create_server(('127.0.0.1', {port})); time.sleep(60)"
    daemon = Daemon(tmp_path, "late")
    stranger: list[socket.socket] = []

    def take_the_port_once_spawned() -> None:
        while not daemon.pidfile.exists():
            time.sleep(0.01)
        stranger.append(socket.create_server(("127.0.0.1", port)))

    threading.Thread(target=take_the_port_once_spawned, daemon=True).start()
    asked: list[bool] = []
    try:
        with pytest.raises(StackError) as refused:
            daemon.start(
                [sys.executable, "-c", binds_late],
                lambda: asked.append(True) or True,
                30,
                ports=(port,),
                port_fix="choose another port",
                stop_fix="stop it",
            )
    finally:
        daemon.stop()
        for server in stranger:
            server.close()
    assert refused.value.message == f"port {port} is in use by something else" and asked == []
    assert daemon.pid() is None


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


def test_ours_running_with_another_key_is_named_not_taken_for_the_one_asked(tmp_path: Path) -> None:
    """A service this folder runs with one key (its environment: an older release's, say), asked for with
    another: the key callers are told to send would be refused by it, which reads as an outage."""
    daemon = Daemon(tmp_path, "sleeper")
    port = free_port()
    server = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]

    def start(key: str) -> bool:
        return daemon.start(server, lambda: port_taken(port), 30, ports=(port,), port_fix="another port",
                            stop_fix="stop it first", env={"SOME_KEY": key})  # fmt: skip

    assert start("one") and start("one")  # (ours, running with it: taken)
    try:
        with pytest.raises(StackError) as refused:
            start("two")
        assert "runs already, with other settings" in refused.value.message and refused.value.fix == "stop it first"
        assert "one" not in (tmp_path / "sleeper.pid").read_text()  # (hashed: the pid file keeps no secret)
    finally:
        assert daemon.stop()


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
