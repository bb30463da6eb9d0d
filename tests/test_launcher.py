"""What a launcher leaves on what it launched elsewhere (a container's label, a Nomad job's ``Meta``, a CVM's
note), and how a later run's sweep judges it: the one rule ``@devcontainer``, ``@nomad`` and
``@confidential`` share (each sweep is tested on its own backend)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import ended_launcher

from metaflow_stack.elsewhere import Launcher, machine, started_at


def test_a_live_launcher_is_not_gone_and_one_that_ended_is() -> None:
    me = Launcher.this()
    assert Launcher.parse(me.label) == Launcher(me.machine, me.pid, round(me.started, 3))
    assert not Launcher.parse(me.label).gone()
    assert Launcher.parse(ended_launcher()).gone()


def test_a_reused_pid_is_not_taken_for_the_launcher() -> None:
    me = Launcher.this()  # this pid runs, but it started later than the launcher that once had it
    assert Launcher(me.machine, me.pid, me.started - 60).gone()


def test_another_boot_has_ended_and_another_host_is_left_to_judge_its_own() -> None:
    host, _, _ = machine().partition("/")
    me = Launcher.this()
    assert Launcher(f"{host}/another-boot", me.pid, me.started).gone()
    assert not Launcher(f"another-host/{machine().partition('/')[2]}", 1, 0.0).gone()


def test_a_zombie_has_ended() -> None:
    """A launcher that died while its parent has not read its end yet is gone."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        launcher = Launcher(machine(), child.pid, started_at(child.pid))
        assert not launcher.gone()
        child.stdin.close()  # it ends; unread, it stays a zombie
        deadline = time.monotonic() + 30
        while not launcher.gone() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert launcher.gone() and child.returncode is None
    finally:
        child.wait(timeout=30)


@pytest.mark.parametrize(
    "label", [None, 7, "", "host:12", "host/boot:pid:0", "host/boot:12:soon", ":12:0", "host:12:0", "host/boot:-3:0"]
)
def test_a_label_that_names_no_launcher_is_not_judged(label: object) -> None:
    assert Launcher.parse(label) is None


def test_a_sweep_removes_only_a_pools_own_folder(tmp_path) -> None:
    """The folder an orphaned pool container's label names is removed only where it is a pool's: an
    absolute, normal path the container mounted at the same path, this user's own ``mf-pool-`` folder, not
    a link (what else a label names, whoever made the container wrote)."""
    from types import SimpleNamespace

    from metaflow_stack.devcontainer.launch import pool_folder

    folder, other, link, file = (tmp_path / name for name in ("mf-pool-a", "work", "mf-pool-link", "mf-pool-f"))
    folder.mkdir()
    other.mkdir()
    link.symlink_to(folder)
    file.write_text("")

    def mounted(path) -> list:
        return [SimpleNamespace(source=str(path), destination=str(path))]

    assert pool_folder(str(folder), mounted(folder)) == str(folder)
    assert pool_folder(str(folder), [SimpleNamespace(source=str(folder), destination="/elsewhere")]) is None
    assert pool_folder(str(folder), []) is None  # (a label on a container that mounted no such folder)
    assert pool_folder(f"{other}/../mf-pool-a", mounted(f"{other}/../mf-pool-a")) is None
    assert pool_folder("mf-pool-a", mounted("mf-pool-a")) is None
    assert pool_folder(str(other), mounted(other)) is None
    assert pool_folder(str(link), mounted(link)) is None
    assert pool_folder(str(file), mounted(file)) is None
    assert pool_folder(None, []) is None
