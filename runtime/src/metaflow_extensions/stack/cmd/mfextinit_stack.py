"""Adds ``metaflow stack ...`` to Metaflow's command line."""

CMDS_DESC = [("stack", ".stack_cli.cli")]
