"""Warm worker pools for foreach steps (``@worker_pool``): every item still a real Metaflow task.

Metaflow's runtime keeps scheduling the step: it creates each item's task,
retries it and joins the results. Only the process it starts per task
changes: instead of a new interpreter that imports Metaflow and the flow
(about 0.4 s of CPU each), a standard-library ``trampoline`` hands the
task's own command line to a pool whose workers have imported everything
once. The task then runs Metaflow's own ``step`` command there, so its id,
attempts, metadata, artifacts and logs are the ones a plain task writes.

Backends sit beside each other behind ``backend.Pool``: ``local`` (a fork
server on this machine), ``redis`` (a queue to workers that claim one task
at a time), ``kubernetes`` and ``nomad`` (that queue's workers as pods, or
as a Nomad job's allocations) and ``ray`` (Ray actors).
"""

#: Set in a pooled task's environment to the worker that runs it (``<pool>/<slot>``), recorded as metadata.
WORKER_VARIABLE = "METAFLOW_STACK_POOL_WORKER"
