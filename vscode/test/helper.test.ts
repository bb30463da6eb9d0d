// The helper process, for real: the runtime's Python answering graphs, a half-written buffer refused in one
// line, and a Python without metaflow-stack named with its fix.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

import type { FlowGraph } from "../src/flowGraph";
import { Helper, Refused } from "../src/helper";

const PYTHON = process.env.METAFLOW_STACK_PYTHON ?? fileURLToPath(new URL("../../.venv/bin/python", import.meta.url));
const FLOW = `from metaflow import FlowSpec, step

class TinyFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass
`;

const helper = new Helper(PYTHON);
after(() => helper.dispose());

test("the helper answers a buffer's graph, then the next one, from one process", async () => {
  const first = await helper.request<FlowGraph>("graph", { path: "tiny_flow.py", source: FLOW });
  assert.equal(first.flow, "TinyFlow");
  assert.deepEqual(first.steps.start.next, ["end"]);
  assert.equal(first.steps.end.line, 9);
  const started = performance.now();
  const second = await helper.request<FlowGraph>("graph", { path: "tiny_flow.py", source: FLOW.replace("TinyFlow", "SmallFlow") });
  assert.equal(second.flow, "SmallFlow");
  assert.ok(performance.now() - started < 1000); // warm: no new Python, no new import
});

test("a half-written buffer is refused in one line naming its line", async () => {
  await assert.rejects(helper.request("graph", { path: "tiny_flow.py", source: `${FLOW}\n    def broken(self` }), (error: unknown) => {
    assert.ok(error instanceof Refused);
    assert.match(error.message, /^line 12: '\(' was never closed/);
    return true;
  });
});

test("a Python without metaflow-stack is named, with the fix", async () => {
  const bare = new Helper("/usr/bin/python3");
  try {
    await assert.rejects(bare.request("graph", { path: "x.py", source: FLOW }), /has no metaflow-stack \(fix: pip install metaflow-stack/);
  } finally {
    bare.dispose();
  }
});
