// The extension's pure logic, with node's own test runner: the graph's shape for the layout, badges, which
// documents are flows, the keystroke debounce, and the webview page's content security policy.
import assert from "node:assert/strict";
import { test } from "node:test";

import { layout, stepStates } from "../../ui/src/dag";
import { badges, dagShape, debounced, type FlowGraph, looksLikeFlow } from "../src/flowGraph";
import { webviewHtml } from "../src/pages";

const step = (type: string, next: string[], line: number, decorators: string[] = []) => ({
  type,
  next,
  line,
  doc: null,
  decorators,
  foreach_artifact: null,
  matching_join: null,
  inside_foreach: false,
  reachable: true,
  invalid_next: false,
});

const GRAPH: FlowGraph = {
  flow: "ShapeFlow",
  line: 4,
  doc: null,
  decorators: [],
  parameters: [],
  start_step: "start",
  end_step: "end",
  steps: {
    start: step("split-static", ["a", "b"], 7),
    a: step("linear", ["join"], 11, ["card"]),
    b: step("linear", ["join"], 15, ["retry"]),
    join: step("join", ["end"], 19),
    end: step("end", [], 23),
  },
};

test("the graph lays out with the UI's layout: every step placed, every edge drawn", () => {
  const shape = dagShape(GRAPH);
  const placed = layout(shape, stepStates(shape, []));
  assert.deepEqual(placed.nodes.map((node) => node.name).sort(), ["a", "b", "end", "join", "start"]);
  assert.equal(placed.edges.length, 5);
  assert.ok(placed.nodes.every((node) => node.status === "pending"));
  const y = Object.fromEntries(placed.nodes.map((node) => [node.name, node.y]));
  assert.ok(y.start < y.a && y.a === y.b && y.b < y.join && y.join < y.end); // top to bottom, branches side by side
});

test("a step's decorators are its badges", () => {
  assert.deepEqual(badges(GRAPH).a, ["card"]);
  assert.deepEqual(badges(GRAPH).start, []);
});

test("only documents that define a flow offer a DAG", () => {
  assert.ok(looksLikeFlow("from metaflow import FlowSpec, step\nclass F(FlowSpec):\n    @step\n    def start(self): ..."));
  assert.ok(!looksLikeFlow("import os\nprint('hello')"));
});

test("a burst of keystrokes asks once, after the pause", async () => {
  const calls: number[] = [];
  const ask = debounced((n: number) => calls.push(n), 30);
  for (let n = 0; n < 10; n++) ask(n);
  await new Promise((done) => setTimeout(done, 80));
  assert.deepEqual(calls, [9]);
});

test("the DAG and launcher pages run only their own script, by nonce, and reach no network", () => {
  for (const name of ["dag", "launcher"] as const) {
    const page = webviewHtml(name, `vscode-resource:/dist/${name}.js`, "vscode-resource:", "abc123");
    const csp = /content="([^"]+)"/.exec(page)?.[1] ?? "";
    assert.match(csp, /default-src 'none'/);
    assert.match(csp, /script-src 'nonce-abc123'/);
    assert.doesNotMatch(csp, /connect-src|unsafe-eval|unsafe-inline'? *;? *script/);
    assert.match(page, new RegExp(`<script nonce="abc123" src="vscode-resource:/dist/${name}.js">`));
  }
});

test("the cards page lets a framed card's inline scripts run, and still reaches no network", () => {
  const page = webviewHtml("cards", "vscode-resource:/dist/cards.js", "vscode-resource:", "abc123");
  const csp = /content="([^"]+)"/.exec(page)?.[1] ?? "";
  assert.match(csp, /default-src 'none'/);
  assert.match(csp, /script-src vscode-resource: 'unsafe-inline'/); // no nonce: it would switch unsafe-inline off
  assert.doesNotMatch(csp, /connect-src|unsafe-eval|nonce-/);
});
