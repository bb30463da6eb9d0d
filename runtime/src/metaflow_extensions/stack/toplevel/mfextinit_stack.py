"""Metaflow's entry point for the names Metaflow Stack adds to ``metaflow``."""

toplevel = "stack_toplevel"
