"""The stack on Kubernetes: a kind cluster on this machine, the dev stack installed on it by the Pulumi
program of ``infra/pulumi``, and the Metaflow configuration that reaches it.

``kind`` makes the cluster (its service ports published on the Docker bridge's address, which this
machine and the cluster's pods both reach), ``stack`` drives the Pulumi program through Pulumi's
Automation API, ``profile`` writes the Metaflow profile from the stack's outputs.
"""
