"""``@nomad``: Metaflow tasks as Nomad batch jobs, in the stack's images (``docs/nomad.md``).

``task`` is what the ``nomad step`` trampoline runs (Metaflow's job script, registered, followed and
purged), ``deployment`` and ``dispatched`` a whole flow deployed as one job, ``dev_cluster`` the dev
agent. They talk to Nomad through the core's ``engines.nomad``; the decorator and its trampoline are in
``metaflow_extensions/stack/plugins/nomad``; issue 19 lists what is still to build.
"""
