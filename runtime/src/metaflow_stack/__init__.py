"""Metaflow Stack runtime: picks, builds and launches the image each capability needs.

Metaflow packages every imported module that sets ``METAFLOW_PACKAGE_POLICY =
"include"`` into a flow's code package, so task-side hooks can import this
runtime inside any container that has Metaflow's own dependencies, whether or
not the image installed it (see docs/decisions/0002-runtime-in-tasks.md).
"""

from importlib.metadata import PackageNotFoundError, version

METAFLOW_PACKAGE_POLICY = "include"

try:
    __version__ = version("metaflow-stack")
except PackageNotFoundError:  # running from a code package inside a task
    __version__ = "0+packaged"
