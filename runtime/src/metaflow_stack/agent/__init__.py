"""Bounded, structured queries of Metaflow runs for scripts and AI agents.

``connect()`` returns ``Queries`` on the configured metadata service (one
request per question) or, without one, on the local datastore; each answer
is a pydantic model (``.model_dump()`` is JSON-ready) that states its bounds.
``metaflow agent`` and ``metaflow-stack-mcp`` expose the same.
"""

from metaflow_stack.agent.queries import Queries, connect
from metaflow_stack.agent.source import AgentError

__all__ = ["AgentError", "Queries", "connect"]
