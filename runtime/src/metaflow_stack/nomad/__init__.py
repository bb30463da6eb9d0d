"""``@nomad``: Metaflow tasks as Nomad batch jobs, in the stack's images (``docs/nomad.md``).

``jobspec`` renders a task attempt as Nomad's job JSON, ``client`` talks to an agent (blocking
queries, the log stream), ``logs`` decodes the log endpoint's frames as they arrive, ``watch``
follows a job to its real exit code, ``task`` is what the ``nomad step`` trampoline runs: the job's
script, registered, followed and purged. The decorator and its trampoline are in
``metaflow_extensions/stack/plugins/nomad``; issue 19 lists what is still to build.
"""
