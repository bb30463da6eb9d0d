"""The stack on Kubernetes: a kind cluster on this machine, the dev stack installed on it by the Pulumi
program of ``infra/pulumi``, and the Metaflow configuration that reaches it.

``kind`` makes the cluster (its service ports published on this machine's loopback), ``stack`` drives
the Pulumi program through Pulumi's Automation API, ``profile`` writes the Metaflow profile from the
stack's outputs, ``dev`` is the three commands.
"""
