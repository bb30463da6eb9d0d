"""Settings come from METAFLOW_STACK_* variables, then Metaflow config, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaflow_stack import settings


def test_ca_bundle_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    for variable in settings.CA_BUNDLE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("METAFLOW_STACK_CA_BUNDLE", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert settings.load().ca_bundle == bundle


def test_no_ca_bundle_when_none_is_named_or_the_file_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in settings.CA_BUNDLE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("METAFLOW_STACK_CA_BUNDLE", str(tmp_path / "missing.pem"))
    assert settings.load().ca_bundle is None


def test_registry_setting_drops_a_trailing_slash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAFLOW_STACK_REGISTRY", "127.0.0.1:5000/")
    assert settings.load().registry == "127.0.0.1:5000"
