import { describe, expect, it } from "vitest";

import { byRun } from "./lineage";

describe("byRun", () => {
  it("groups records by run in the order found, then by step, counting tasks and naming each name once", () => {
    const grouped = byRun([
      { pathspec: "F/2/fan/22", name: "items" },
      { pathspec: "F/2/fan/22", name: "_foreach_values" },
      { pathspec: "F/2/each/24", name: "items" },
      { pathspec: "F/2/each/25", name: "items" },
      { pathspec: "F/3/fan/41", name: "items" },
    ]);
    expect(grouped.map(([run]) => run)).toEqual(["F/2", "F/3"]);
    const [fan, each] = grouped[0][1];
    expect([fan.step, fan.names, fan.count, fan.first]).toEqual(["fan", ["items", "_foreach_values"], 1, "F/2/fan/22"]);
    expect([each.step, each.count]).toEqual(["each", 2]);
  });
});
