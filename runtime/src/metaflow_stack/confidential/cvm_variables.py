"""The variables a confidential task's CVM is sent encrypted (``cvm.app_for``), named in one place.

dstack hands the variables its app compose allows (``allowed_envs``) to the
environment of the root script that starts the compose, so a name beyond
these (``BASH_ENV``, ``COMPOSE_FILE``) would let whoever can encrypt to the
app run what no policy pinned: the keeper refuses an app compose that allows
one (``dstack_app``).
"""

from __future__ import annotations

#: A CVM's Metaflow settings and datastore credentials (JSON, encrypted to it; ``inside.settings_exports``).
SETTINGS = "METAFLOW_STACK_CONFIDENTIAL_SETTINGS"
#: Where the enclave's entry hands the order it read, once, to the task it starts (enclave memory); a CVM
#: receives its order in it.
ORDER = "METAFLOW_STACK_CONFIDENTIAL_ORDER"
#: A CVM's key for saying how its task ended (encrypted to it, new each attempt): an end in the exchange that
#: it does not authenticate is not its CVM's (whoever may write the run's datastore could put one there).
END_KEY = "METAFLOW_STACK_CONFIDENTIAL_END_KEY"
#: The variables that name the attempt in the command's log capture (they differ per task).
ATTEMPT = {"run_id": "MF_TASK_RUN", "task_id": "MF_TASK_ID", "attempt": "MF_TASK_ATTEMPT"}
#: Every name a CVM is sent, and so the only ones its app compose may allow.
ENCRYPTED = frozenset({SETTINGS, ORDER, END_KEY, *ATTEMPT.values()})
