// Grouping for the lineage page: where else a value was stored, by run and step.

export type Held = { step: string; names: string[]; first: string; count: number };

/** Records of the value grouped by run (in the order found: oldest first), then by step. */
export function byRun(records: { pathspec: string; name: string }[]): [string, Held[]][] {
  const runs = new Map<string, Map<string, Held & { tasks: Set<string> }>>();
  for (const record of records) {
    const [flow, run, step] = record.pathspec.split("/");
    const steps = runs.get(`${flow}/${run}`) ?? new Map();
    runs.set(`${flow}/${run}`, steps);
    const held = steps.get(step) ?? { step, names: [], first: record.pathspec, count: 0, tasks: new Set<string>() };
    steps.set(step, held);
    if (!held.names.includes(record.name)) held.names.push(record.name);
    held.tasks.add(record.pathspec);
    held.count = held.tasks.size;
  }
  return [...runs].map(([run, steps]) => [run, [...steps.values()]]);
}
