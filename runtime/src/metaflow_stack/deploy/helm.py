"""Render a chart from ``infra/helm`` offline and validate every manifest against Kubernetes' schemas.

Helm's own engine renders (through ``helm-python-sdk``, no helm binary), the
chart's ``values.schema.json`` checks the values first, and each manifest is
validated in strict mode against the Kubernetes API schemas of the target
version (``kubernetes-validate``), so an invalid release fails here, naming
the object and the field, before anything reaches a cluster.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaflow_stack.deploy import infra_root, require, write_atomically
from metaflow_stack.errors import StackError, ToolMissingError

#: The Kubernetes version manifests are validated against unless told otherwise.
KUBERNETES_VERSION = "1.30"
#: Seconds a ``kubectl`` call has unless told otherwise.
KUBECTL_TIMEOUT_S = 120


@dataclass
class Release:
    """A rendered, validated release: what ``kubectl apply`` takes, and what only ``helm test`` runs."""

    name: str
    namespace: str
    manifests: list[dict[str, Any]]
    hooks: list[dict[str, Any]] = field(default_factory=list)
    notes: str = ""

    def to_yaml(self) -> str:
        """The manifests as one multi-document YAML stream (hooks left out)."""
        import yaml

        return "---\n".join(yaml.safe_dump(m, sort_keys=False) for m in self.manifests)


def chart_dir(chart: str) -> Path:
    """The folder of ``chart`` under ``infra/helm``."""
    path = infra_root() / "helm" / chart
    if not (path / "Chart.yaml").is_file():
        raise StackError(f"no chart {chart!r} under {path.parent}", fix="check the chart name")
    return path


def render(
    chart: str,
    values: dict[str, Any],
    release: str,
    namespace: str = "default",
    kubernetes_version: str = KUBERNETES_VERSION,
) -> Release:
    """Render ``chart`` with ``values`` as ``release`` and validate every manifest."""
    helm = require("helm_python")
    import yaml

    try:
        helm.validate_release_name(release)
    except helm.HelmError as exc:
        message = f"{release!r} is not a valid release name: {exc}"
        raise StackError(message, fix="use lowercase letters, digits and '-', at most 53 characters") from None
    loaded = helm.Chart.load(chart_dir(chart))
    try:
        merged = loaded.merge_values(values)
        loaded.validate_schema(merged)
        rendered = loaded.render(merged, name=release, namespace=namespace, is_install=True)
    except helm.HelmError as exc:
        raise StackError(f"chart {chart} refused the values: {exc}", fix="correct the values named above") from None

    result = Release(release, namespace, [])
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            result.notes = text.strip()
            continue
        try:
            manifests = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:  # (every value is quoted or checked by the schema: a template's own fault)
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise StackError(f"chart {chart} rendered {path} as YAML that does not parse{where}",
                             fix="correct the template or the values it writes there") from None  # fmt: skip
        for manifest in manifests:
            if not manifest:
                continue
            validate_manifest(manifest, f"{path}: ", kubernetes_version)
            annotations = manifest.get("metadata", {}).get("annotations") or {}
            (result.hooks if "helm.sh/hook" in annotations else result.manifests).append(manifest)
    return result


def validate_manifest(manifest: dict[str, Any], where: str = "", kubernetes_version: str = KUBERNETES_VERSION) -> None:
    """Refuse ``manifest`` unless it is valid by the Kubernetes API's schema, strictly (no unknown field)."""
    validator = require("kubernetes_validate")
    name = f"{where}{manifest.get('kind')}/{manifest.get('metadata', {}).get('name')}"
    try:
        validator.validate(manifest, kubernetes_version, strict=True)
    except validator.ValidationError as exc:
        field_path = ".".join(str(p) for p in exc.path) or "(top level)"
        raise StackError(
            f"{name} is not valid Kubernetes {kubernetes_version}: {field_path}: {exc.message}",
            fix=f"correct the template or values for {field_path}",
        ) from None


def write(release: Release, folder: Path, values: dict[str, Any]) -> list[Path]:
    """Write the manifests (for ``kubectl apply``) and the values (for ``helm install -f``)."""
    import yaml

    return [
        write_atomically(folder / "kubernetes.yaml", release.to_yaml()),
        write_atomically(folder / "values.yaml", yaml.safe_dump(values, sort_keys=False)),
    ]


def apply(manifests: Path, namespace: str) -> str:
    """``kubectl apply`` the written manifests to the current context; return kubectl's report."""
    return kubectl("apply", "--namespace", namespace, "-f", str(manifests)).strip()


def kubectl(
    *args: str, stdin: str | None = None, timeout_s: float = KUBECTL_TIMEOUT_S, context: str | None = None
) -> str:
    """Run ``kubectl`` on ``context`` (default: the current one) and return what it printed; ``StackError``
    with its last line if it fails (a Secret's manifest goes on ``stdin``: on no command line)."""
    binary = shutil.which("kubectl")
    if binary is None:
        raise ToolMissingError("kubectl is not on PATH", fix="install kubectl and point it at the cluster")
    line = [binary, *(["--context", context] if context else []), *args]
    try:
        done = subprocess.run(line, input=stdin, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise StackError(f"kubectl {args[0]} did not end in {timeout_s:.0f}s", fix="check the cluster") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise StackError(f"kubectl {args[0]} failed: {lines[-1]}", fix="check the current kubectl context")
    return done.stdout


def image_values(image: str) -> dict[str, str]:
    """A chart's ``image`` values from a reference: its repository and its tag, its digest (a pull pinned to
    its content), or both (a registry's port is not a tag); ``StackError`` for a reference with neither."""
    named, _, digest = image.partition("@")
    repository, _, tag = named.rpartition(":")
    if not repository or "/" in tag:
        repository, tag = named, ""
    if not tag and not digest:
        raise StackError(
            f"{image!r} names no tag", fix="give the image as REPOSITORY:TAG (as build-image prints it) or @sha256:..."
        )
    return {"repository": repository, **({"tag": tag} if tag else {}), **({"digest": digest} if digest else {})}
