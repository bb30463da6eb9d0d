"""``@nomad``: Metaflow tasks as Nomad batch jobs, in the stack's images (``docs/nomad.md``).

``jobspec`` renders a task as Nomad's job JSON, ``logs`` decodes the frames of
Nomad's log endpoint as they arrive. Work in progress: see issue 19.
"""
