"""Adds ``metaflow stack``, ``function``, ``service``, ``agent``, ``ui``, ``devcontainer``, ``notebook``,
``ide`` and ``confidential`` to Metaflow's command line."""

CMDS_DESC = [
    ("stack", ".stack_cli.cli"),
    ("function", ".function_cli.cli"),
    ("service", ".service_cli.cli"),
    ("agent", ".agent_cli.cli"),
    ("ui", ".ui_cli.cli"),
    ("devcontainer", ".devcontainer_cli.cli"),
    ("notebook", ".notebook_cli.cli"),
    ("ide", ".ide_cli.cli"),
    ("confidential", ".confidential_cli.cli"),
]
