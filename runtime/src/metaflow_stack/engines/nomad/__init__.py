"""Nomad as an engine of the core: what ``@nomad``, ``nomad create`` and ``@worker_pool``'s ``nomad``
backend all run jobs through.

``client`` talks to an agent (Nomad's variables, blocking queries, the log stream), ``jobspec``
renders Nomad's job JSON (one task attempt, or a pool's long-running workers), ``logs`` decodes the log
endpoint's frames as they arrive, ``watch`` follows a job to its placement and its real exit code,
``image`` picks the stack's base image where the agent's clients can pull it, and ``orphans`` purges
the jobs of launchers killed outright. It is no ``engines.Engine``: each caller writes Nomad's own job
JSON (a task attempt's, a pool's, a deployed flow's), which ``JobSpec`` does not describe.
"""
