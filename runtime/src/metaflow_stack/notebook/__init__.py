"""Metaflow flows written across a notebook's cells (``%load_ext metaflow_stack.notebook``).

``cells`` reads what a cell declares (``%%flow``, ``%%step``, ``%%helpers``, or the same as cell tags),
``assembler`` makes the flow file those declarations describe, with a map from each of its lines back
to the cell it came from, ``magics`` is the IPython side (declare, run with Metaflow's ``Runner``,
show), ``export`` writes a notebook's flow as a standalone file (``metaflow notebook export``).
"""


def load_ipython_extension(ipython: object) -> None:
    """What ``%load_ext metaflow_stack.notebook`` runs: the magics, registered on this shell."""
    from metaflow_stack.notebook.magics import FlowMagics

    ipython.register_magics(FlowMagics)  # type: ignore[attr-defined]
