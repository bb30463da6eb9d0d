"""The notebook's flow file as an nbconvert exporter: JupyterLab's export command, with no front-end code.

JupyterLab and Notebook 7 list every nbconvert exporter the server has under
File > Save and Export Notebook As, so registering this one (the
``nbconvert.exporters`` entry point ``metaflow``) is what puts "Metaflow" in
that menu; ``jupyter nbconvert --to metaflow NB`` writes the same file. It is
the file ``%mf_export`` and ``metaflow notebook export`` write. nbconvert
loads this module; nothing else imports it.
"""

from __future__ import annotations

from typing import Any

from nbconvert.exporters import Exporter
from nbconvert.utils.exceptions import ConversionException

from metaflow_stack.errors import StackError
from metaflow_stack.notebook.export import formatted, from_cells


class FlowExporter(Exporter):
    """The flow the notebook's cells declare, formatted, as a ``.py`` file."""

    export_from_notebook = "Metaflow flow"
    output_mimetype = "text/x-python"

    def _file_extension_default(self) -> str:
        return ".py"

    def from_notebook_node(self, nb: Any, resources: dict | None = None, **kw: Any) -> tuple[str, dict]:
        notebook, resources = super().from_notebook_node(nb, resources, **kw)
        try:
            source = formatted(from_cells(notebook).source)
        except StackError as exc:  # one line with its fix: the front end shows it, nbconvert prints no traceback
            raise ConversionException(str(exc)) from None
        return source, resources
