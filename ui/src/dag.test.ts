import { describe, expect, it } from "vitest";

import type { Graph, TaskInfo } from "./api";
import { aggregate, layout, stepStates } from "./dag";

const graph: Graph = {
  start_step: "start",
  end_step: "end",
  file: "flow.py",
  doc: null,
  parameters: {},
  steps: {
    start: { type: "split-static", next: ["a", "b"], foreach_artifact: null, matching_join: "join", doc: null, decorators: [] },
    a: { type: "split-foreach", next: ["each"], foreach_artifact: "items", matching_join: "inner", doc: null, decorators: [] },
    each: { type: "linear", next: ["inner"], foreach_artifact: null, matching_join: null, doc: null, decorators: [] },
    inner: { type: "join", next: ["join"], foreach_artifact: null, matching_join: null, doc: null, decorators: [] },
    b: { type: "linear", next: ["join"], foreach_artifact: null, matching_join: null, doc: null, decorators: [] },
    join: { type: "join", next: ["end"], foreach_artifact: null, matching_join: null, doc: null, decorators: [] },
    end: { type: "end", next: [], foreach_artifact: null, matching_join: null, doc: null, decorators: [] },
  },
};

function task(step: string, id: number, status: TaskInfo["status"], foreach: string[] = []): TaskInfo {
  return { pathspec: `F/1/${step}/${id}`, step_name: step, attempt: 0, status, started_at: id, finished_at: null, foreach };
}

describe("step states", () => {
  it("aggregates task statuses, running first", () => {
    expect(aggregate({ running: 1, completed: 3, failed: 1, killed: 0 })).toBe("running");
    expect(aggregate({ running: 0, completed: 3, failed: 1, killed: 0 })).toBe("failed");
    expect(aggregate({ running: 0, completed: 0, failed: 0, killed: 0 })).toBe("pending");
  });

  it("counts each step's tasks and marks foreach items", () => {
    const tasks = [task("start", 1, "completed"), task("each", 2, "completed", ["items=0"]), task("each", 3, "failed", ["items=1"])];
    const states = Object.fromEntries(stepStates(graph, tasks).map((s) => [s.name, s]));
    expect(states.each.counts).toEqual({ running: 0, completed: 1, failed: 1, killed: 0 });
    expect(states.each.status).toBe("failed");
    expect(states.each.inForeach).toBe(true);
    expect(states.b.status).toBe("pending");
    expect(states.start.inForeach).toBe(false);
  });

  it("takes a step's totals from the counts it is given, its tasks being only those to draw", () => {
    const drawn = [task("each", 1, "failed", ["items=0"]), task("each", 2, "running", ["items=1"])];
    const counted = { each: { running: 3, completed: 4990, failed: 7, killed: 0, total: 5000, retried: 12 } };
    const states = Object.fromEntries(stepStates(graph, drawn, counted).map((s) => [s.name, s]));
    expect(states.each.counts).toEqual({ running: 3, completed: 4990, failed: 7, killed: 0 });
    expect([states.each.total, states.each.retried, states.each.tasks.length]).toEqual([5000, 12, 2]);
    expect(states.each.status).toBe("running");
    expect(states.each.inForeach).toBe(true);
    expect([states.b.total, states.b.status]).toEqual([0, "pending"]);
  });
});

describe("layout", () => {
  it("places every step and every edge of the graph, branches side by side", () => {
    const placed = layout(graph, stepStates(graph, []));
    expect(placed.nodes.map((n) => n.name).sort()).toEqual(Object.keys(graph.steps).sort());
    expect(placed.edges.map((e) => `${e.from}->${e.to}`).sort()).toEqual(
      ["start->a", "start->b", "a->each", "each->inner", "inner->join", "b->join", "join->end"].sort(),
    );
    const at = Object.fromEntries(placed.nodes.map((n) => [n.name, n]));
    expect(Math.min(at.a.y, at.b.y)).toBeGreaterThan(at.start.y);
    expect(at.a.x).not.toBe(at.b.x);
    expect(at.end.y).toBeGreaterThan(at.join.y);
    expect(placed.edges.find((e) => e.from === "a")?.foreach).toBe(true);
  });
});
