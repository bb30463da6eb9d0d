"""Adds ``metaflow stack ...`` and ``metaflow function ...`` to Metaflow's command line."""

CMDS_DESC = [("stack", ".stack_cli.cli"), ("function", ".function_cli.cli")]
