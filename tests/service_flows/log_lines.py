"""Prints a task's log lines as Metaflow's Client API reads them, as a JSON
list of texts: ``log_lines.py <pathspec> <stdout|stderr> [attempt]``."""

import json
import sys

from metaflow import Task, namespace

namespace(None)
attempt = int(sys.argv[3]) if len(sys.argv) > 3 else None
task = Task(sys.argv[1], attempt=attempt)
print(json.dumps([text for _, text in task.loglines(sys.argv[2])]))
