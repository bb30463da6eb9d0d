"""Print what Metaflow's Client API shows of every FanFlow run, as JSON.

Run under a given metadata provider; ids are left out (each provider numbers
runs and tasks its own way), everything a user reads is kept. The
``exception`` metadatum is left out too: this project's client adds it on a
failing attempt, Metaflow's local provider does not.
"""

import json

from metaflow import Flow, namespace

VOLATILE_METADATA = {"exception"}


def task_view(task):
    return {
        "index": task.index,
        "successful": task.successful,
        "finished": task.finished,
        "attempt": task.current_attempt,
        "artifacts": sorted(a.id for a in task),
        "value": task.data.value if "value" in task else None,
        "metadata": sorted(set(task.metadata_dict) - VOLATILE_METADATA),
        "parent_steps": sorted({p.split("/")[2] for p in task.parent_task_pathspecs}),
    }


def run_view(run):
    return {
        "successful": run.successful,
        "finished": run.finished,
        "user_tags": sorted(run.user_tags),
        "system_tags": sorted(t for t in run.system_tags if not t.startswith("metaflow_version:")),
        "steps": {
            step.id: sorted((task_view(t) for t in step), key=lambda v: (v["index"] is None, v["index"]))
            for step in run
        },
        "total": run.data.total if run.successful else None,
    }


namespace(None)
flow = Flow("FanFlow")
runs = sorted(flow, key=lambda r: r.created_at)
print(
    json.dumps(
        {
            "runs": [run_view(r) for r in runs],
            "latest_successful": [r.pathspec for r in runs].index(flow.latest_successful_run.pathspec),
        }
    )
)
