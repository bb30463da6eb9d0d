// The run launcher's model: the launcher's command line and its JSON lines (the fields' types are the
// runtime's, tested with it in tests/test_ide_runs.py).
import assert from "node:assert/strict";
import { test } from "node:test";

import { launchArgs, launchEvent } from "../src/launcherModel";

test("the launcher's arguments: each given value as --param, empty ones left to their defaults", () => {
  assert.deepEqual(launchArgs("/w/train_flow.py", { alpha: "0.7", who: "", note: "a=b c" }, "worker_pool"), [
    "-m", "metaflow_stack.ide", "launch", "/w/train_flow.py", "--param", "alpha=0.7", "--param", "note=a=b c", "--backend", "worker_pool",
  ]); // prettier-ignore
});

test("the launcher's lines are JSON events; anything else is ignored", () => {
  assert.deepEqual(launchEvent('{"event": "started", "run": "TrainFlow/12"}'), { event: "started", run: "TrainFlow/12" });
  assert.equal(launchEvent("Metaflow 2.19 executing"), null);
  assert.equal(launchEvent("3"), null);
});
