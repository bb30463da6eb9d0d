"""Names Metaflow Stack adds to the ``metaflow`` namespace.

Metaflow copies this module's public globals into ``metaflow`` and reads
``__mf_extensions__``/``__version__`` for its version string
(``2.19.x+stack(0.1.0)``). Importing the runtime here also puts it in every
code package (it sets ``METAFLOW_PACKAGE_POLICY = "include"``).
"""

import metaflow_stack
from metaflow_stack.functions import FunctionParameters, JsonFunction, function_from_json, json_function

__mf_extensions__ = "stack"
__version__ = metaflow_stack.__version__

__all__ = ["FunctionParameters", "JsonFunction", "function_from_json", "json_function"]
