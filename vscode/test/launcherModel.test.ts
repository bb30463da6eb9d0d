// The run launcher's model: a field per Parameter with its type (declared, or inferred from the default as
// Metaflow does), the launcher's command line, and its JSON lines.
import assert from "node:assert/strict";
import { test } from "node:test";

import type { FlowParameter } from "../src/flowGraph";
import { fields, launchArgs, launchEvent } from "../src/launcherModel";

const parameter = (name: string, values: Partial<FlowParameter>): FlowParameter => ({
  attribute: name,
  name,
  kind: "Parameter",
  default: null,
  type: null,
  help: null,
  required: false,
  line: 1,
  ...values,
});

test("each Parameter is a field typed as Metaflow types it; files and configs are not typed into a form", () => {
  const found = fields([
    parameter("alpha", { default: "0.5", type: "float", help: "the rate" }),
    parameter("count", { default: "4" }),
    parameter("loud", { default: "False" }),
    parameter("who", { default: '"world"' }),
    parameter("config", { default: "'{}'", type: "metaflow.JSONType" }),
    parameter("must", { required: true }),
    parameter("data", { kind: "IncludeFile" }),
  ]);
  assert.deepEqual(
    found.map((f) => [f.name, f.type, f.required]),
    [["alpha", "float", false], ["count", "int", false], ["loud", "bool", false], ["who", "str", false], ["config", "JSONType", false], ["must", "str", true]],
  );
  assert.equal(found[0].help, "the rate");
  assert.equal(found[0].placeholder, "0.5");
});

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
