"""``@devcontainer``: a Metaflow step run in a Docker container sandbox, on this machine.

``policy`` turns the decorator's settings into the container's limits; ``spec``, ``image``,
``task_container`` and ``lifecycle`` turn a devcontainer.json into an image and the settings of
every task's container; ``stores`` says what a container needs to reach the run's datastore and
metadata; ``code`` unpacks the code package once per machine; ``launch`` runs one task's step
command in a container and relays its output and exit code to Metaflow's runtime; ``generate``
captures a step's environment as a devcontainer.json. The decorator, its ``step`` trampoline and
``metaflow devcontainer generate`` live in ``metaflow_extensions.stack``.
"""
