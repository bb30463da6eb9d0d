// The runs sidebar's model: how runs, steps, tasks and artifacts are labelled, the run query each filter
// makes, Metaflow's own artifacts after the user's, and what Copy Pathspec and Copy Snippet give.
import assert from "node:assert/strict";
import { test } from "node:test";

import { clientSnippet, describeFilters, NO_FILTERS, type Node, ordered, pathspecOf, runQuery, shown, since, type RunInfo } from "../src/runsModel";

const NOW = Date.UTC(2026, 11, 3, 12, 0, 0);
const RUN: RunInfo = {
  pathspec: "TrainFlow/1764",
  status: "failed",
  user: "ana",
  tags: ["nightly"],
  system_tags: [],
  started_at: NOW - 5 * 60_000,
  finished_at: NOW - 4 * 60_000,
};

test("a run shows its id, status, age, user and tags, with its status's icon", () => {
  const look = shown({ kind: "run", run: RUN }, NOW);
  assert.equal(look.label, "1764");
  assert.equal(look.description, "failed · 5m ago · ana · nightly");
  assert.equal(look.icon, "error");
  assert.match(look.tooltip ?? "", /TrainFlow\/1764\nfailed in 1m 0s/);
  assert.equal(shown({ kind: "run", run: { ...RUN, status: "running", finished_at: null } }, NOW).icon, "sync~spin");
});

test("a step counts its tasks; a foreach task names its item and retried attempt", () => {
  const step: Node = { kind: "step", run: "TrainFlow/1764", step: { step_name: "fit", total: 4, running: 1, completed: 2, failed: 1, killed: 0 } };
  assert.deepEqual([shown(step).description, shown(step).icon], ["2/4 done · 1 failed · 1 running", "error"]);
  const task: Node = {
    kind: "task",
    task: { pathspec: "TrainFlow/1764/fit/7", step_name: "fit", attempt: 2, status: "completed", started_at: 0, finished_at: 1500, foreach: ["items=3"] },
  };
  assert.deepEqual([shown(task).label, shown(task).description], ["7", "completed · attempt 2 · items=3"]);
});

test("artifacts: sizes in binary units, the user's before Metaflow's own", () => {
  const artifact = (name: string, size: number | null) => ({ pathspec: "F/1/s/2", name, attempt: 0, size, python_type: "dict", sha: "ab" });
  assert.deepEqual(
    ordered([artifact("_task_ok", 4), artifact("model", 3 * 1024 * 1024), artifact("accuracy", 21)]).map((a) => a.name),
    ["accuracy", "model", "_task_ok"],
  );
  assert.equal(shown({ kind: "artifact", artifact: artifact("model", 3 * 1024 * 1024) }).description, "dict · 3.0 MiB");
});

test("filters become the helper's run query; mine is the user the runtime names", () => {
  assert.deepEqual(runQuery("TrainFlow", NO_FILTERS, "ana", null), { flow: "TrainFlow", status: null, tags: [], user: null, limit: 100, cursor: null });
  const filters = { status: "failed" as const, tags: ["nightly"], mine: true };
  assert.deepEqual(runQuery("TrainFlow", filters, "ana", "c1"), { flow: "TrainFlow", status: "failed", tags: ["nightly"], user: "ana", limit: 100, cursor: "c1" });
  assert.equal(describeFilters(filters), "failed · #nightly · mine");
  assert.equal(describeFilters(NO_FILTERS), "");
});

test("copy gives the pathspec, and a Client API snippet that loads it in every namespace", () => {
  const artifact: Node = { kind: "artifact", artifact: { pathspec: "TrainFlow/1764/fit/7", name: "model", attempt: 0, size: 1, python_type: null, sha: null } };
  assert.equal(pathspecOf(artifact), "TrainFlow/1764/fit/7/model");
  assert.equal(clientSnippet(artifact), 'from metaflow import Task, namespace\nnamespace(None)\nmodel = Task("TrainFlow/1764/fit/7")["model"].data');
  assert.equal(pathspecOf({ kind: "more", parent: null, cursor: "x" }), null);
});

test("ages read in the largest whole unit", () => {
  assert.deepEqual([since(NOW - 9_000, NOW), since(NOW - 3 * 3600_000, NOW), since(NOW - 49 * 3600_000, NOW)], ["9s ago", "3h ago", "2d ago"]);
});
