"""Adds ``metaflow stack``, ``metaflow function`` and ``metaflow service`` to Metaflow's command line."""

CMDS_DESC = [("stack", ".stack_cli.cli"), ("function", ".function_cli.cli"), ("service", ".service_cli.cli")]
