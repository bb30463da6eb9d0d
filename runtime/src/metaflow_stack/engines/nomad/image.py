"""The image a Nomad job runs when none is named: the stack's ``base``, where the agent's clients can pull it."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse

from metaflow_stack import images, settings
from metaflow_stack.engines.nomad.client import Settings
from metaflow_stack.errors import StackError


def stack_image(agent: Settings, named_by: str) -> str:
    """The stack's base image, pushed to the configured registry; without one, only for an agent on this
    machine (a dev agent shares this Docker engine): any other could not pull it. ``named_by`` is how the
    user names another image instead (``@nomad(image=...)``, ``--image``)."""
    reference = images.resolve("base")
    if settings.load().registry:
        return images.push_reference(reference, by_digest=True)  # (what runs is what was pushed: a tag can move)
    if not on_this_machine(agent.address):
        raise StackError(
            f"the stack's base image {reference} is only on this machine, which the Nomad clients cannot pull from",
            fix=f"configure a registry they reach (METAFLOW_STACK_REGISTRY), or give {named_by}",
        )
    return reference


def on_this_machine(address: str) -> bool:
    """Whether the agent at ``address`` is on this machine's loopback."""
    host = urlparse(address).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
