"""``@devcontainer``: a Metaflow step run in a Docker container sandbox, on this machine.

``policy`` turns the decorator's settings into the container's limits;
``launch`` runs one task's step command in a container and relays its
output and exit code to Metaflow's runtime. The decorator and its ``step``
trampoline live in ``metaflow_extensions.stack.plugins.devcontainer``.
"""
