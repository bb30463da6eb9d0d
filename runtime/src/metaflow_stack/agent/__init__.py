"""Bounded, structured queries of Metaflow runs for scripts and AI agents.

``connect()`` returns ``Queries`` on the configured metadata service; each
query costs one request and answers a pydantic model (``.model_dump()`` is
JSON-ready) that states its bounds. ``metaflow agent`` exposes the same.
"""

from metaflow_stack.agent.queries import AgentError, Queries, connect

__all__ = ["AgentError", "Queries", "connect"]
