"""What a tracking library does as it is imported (MLflow's fluent API, say): it registers an ``atexit``
callback that ends its run. This one notes, in ``POOL_FLOW_EXITS/tracker.log``, the step of each task
process that ends; imported by ``pool_flow.py`` at its top, so in a pool it is imported once, by the pool."""

import atexit
import os
import sys


def _ended() -> None:
    if "step" in sys.argv:  # (a task: not the run's runtime, not a pool)
        with open(os.path.join(os.environ["POOL_FLOW_EXITS"], "tracker.log"), "a") as log:
            log.write(sys.argv[sys.argv.index("step") + 1] + "\n")


atexit.register(_ended)
