"""`metaflow stack doctor` tells what this machine has and the exact fix for the rest."""

from __future__ import annotations

import pytest
from conftest import DEAD_ENGINE_ENV, json_stdout, run_cli

from metaflow_stack import registry
from metaflow_stack.engines.docker import NO_ENGINE_FIX


def test_doctor_prints_a_table_of_every_check() -> None:
    result = run_cli("stack", "doctor")
    assert result.returncode == 0, result.stderr
    for name in (
        "Python",
        "Metaflow",
        "Docker engine",
        "BuildKit",
        "Image registry",
        "Ray",
        "Nomad",
        "kind",
        "kubectl",
        "helm",
        "Pulumi CLI",
        "Gramine",
        "Chromium",
    ):
        assert name in result.stdout


def test_every_failing_check_names_its_fix() -> None:
    checks = json_stdout(run_cli("stack", "doctor", "--json"))
    assert {c["name"] for c in checks} >= {"Python", "Metaflow", "Docker engine"}
    for check in checks:
        assert check["ok"] or check["fix"], check


@pytest.mark.docker
def test_doctor_sees_the_running_engine(docker_engine) -> None:
    checks = {c["name"]: c for c in json_stdout(run_cli("stack", "doctor", "--json"))}
    assert checks["Docker engine"]["ok"] is True
    assert checks["Docker engine"]["detail"].startswith("server ")


def test_without_an_engine_doctor_says_how_to_start_one() -> None:
    checks = {c["name"]: c for c in json_stdout(run_cli("stack", "doctor", "--json", env=DEAD_ENGINE_ENV))}
    assert checks["Docker engine"]["ok"] is False
    assert checks["Docker engine"]["fix"] == NO_ENGINE_FIX


def test_without_an_engine_commands_fail_with_the_doctor_message() -> None:
    result = run_cli("stack", "images", "build", "base", env=DEAD_ENGINE_ENV)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: no Docker engine answers" in result.stderr
    assert f"fix: {NO_ENGINE_FIX}" in " ".join(result.stderr.split())


def test_require_fails_when_a_required_check_fails() -> None:
    result = run_cli("stack", "doctor", "--require", "Docker engine", env=DEAD_ENGINE_ENV)
    assert result.returncode == 1
    assert "required check(s) failing: Docker engine" in result.stderr


def test_require_rejects_unknown_check_names() -> None:
    result = run_cli("stack", "doctor", "--require", "Docker engin")
    assert result.returncode == 1
    assert "unknown check(s): Docker engin" in result.stderr


@pytest.mark.parametrize("setting", ["localhost:500O", "[::1", "http://127.0.0.1:5000"])
def test_a_malformed_registry_setting_is_a_row_naming_it_not_a_crash(setting: str) -> None:
    """`just up` runs the doctor first: a typo in METAFLOW_STACK_REGISTRY must not end it with a traceback."""
    assert registry.ping(setting) is False
    result = run_cli("stack", "doctor", "--json", env={"METAFLOW_STACK_REGISTRY": setting})
    assert result.returncode == 0, result.stderr
    check = {c["name"]: c for c in json_stdout(result)}["Image registry"]
    assert check["ok"] is False and check["detail"].startswith(f"METAFLOW_STACK_REGISTRY is {setting!r}")
    assert "METAFLOW_STACK_REGISTRY" in check["fix"]
