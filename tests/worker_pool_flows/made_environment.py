"""``python made_environment.py PREFIX FLOW_FILE ARGS...``: ``python FLOW_FILE ARGS...`` with Metaflow's
``--environment pypi|conda`` told that every step's environment is made already, at ``PREFIX``.

A double of micromamba's part only (micromamba is not on these machines; the test makes ``PREFIX``
itself, a virtual environment where micromamba would put one): the two calls of Metaflow's environment
that reach micromamba, making the environments at the run's start and finding a step's interpreter, are
replaced in the runtime's process. Everything else is Metaflow's own: its ``@conda`` hooks, the code
package on each task's path, the ``conda_env_prefix`` metadata. The GitHub ``pypi-environments`` job
runs the same flow with micromamba.
"""

import os
import sys
from pathlib import Path

from metaflow.plugins.pypi.conda_environment import CondaEnvironment

prefix, flow_file = sys.argv[1], os.path.abspath(sys.argv[2])
CondaEnvironment.init_environment = lambda self, echo, only_steps=None: echo("(environments made by the test)")
CondaEnvironment.interpreter = lambda self, step_name: os.path.join(prefix, "bin", "python")
sys.argv = sys.argv[2:]
sys.path[0] = os.path.dirname(flow_file)
main = sys.modules["__main__"]  # the flow runs as `python flow.py` runs it: in __main__, named by its file
main.__file__ = flow_file
exec(compile(Path(flow_file).read_bytes(), flow_file, "exec"), vars(main))
