"""``python -m metaflow_stack.ide``: ``metaflow ide`` without Metaflow's banner on stdout, so an editor's helper
process answers JSON lines and nothing else."""

from metaflow_extensions.stack.cmd.ide_cli import ide

ide(prog_name="metaflow ide")
