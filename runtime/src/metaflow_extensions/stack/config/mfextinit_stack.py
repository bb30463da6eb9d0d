"""Publishes the ``STACK_*`` settings in ``metaflow.metaflow_config``.

The values come from ``metaflow_stack.settings``, the one loader, so
``METAFLOW_STACK_*`` variables and config.json entries work as Metaflow's own do.
"""

from metaflow_stack.settings import load as _load_settings

globals().update(_load_settings().as_metaflow_config())
del _load_settings
