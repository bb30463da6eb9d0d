// The flow's graph as the runtime answers it (`metaflow ide graph`), and what the webview draws from it.
import type { Status, TaskInfo } from "../../ui/src/api";
import type { DagShape } from "../../ui/src/dag";

export interface GraphStep {
  type: string;
  next: string[];
  line: number;
  doc: string | null;
  decorators: string[];
  foreach_artifact: string | null;
  matching_join: string | null;
  inside_foreach: boolean;
  reachable: boolean;
  invalid_next: boolean;
}

export interface FlowParameter {
  attribute: string;
  name: string | null;
  kind: string;
  default: string | null;
  type: string | null;
  help: string | null;
  required: boolean;
  line: number;
}

export interface FlowGraph {
  flow: string;
  line: number;
  doc: string | null;
  decorators: string[];
  parameters: FlowParameter[];
  start_step: string | null;
  end_step: string | null;
  steps: Record<string, GraphStep>;
}

/** What the extension posts to the webview: the graph (the last good one stays when the buffer breaks), and
 *  a run's tasks to overlay their statuses on it (live while the run runs; ``run: null`` clears it). */
export type ToWebview =
  | { type: "graph"; graph: FlowGraph; file: string }
  | { type: "error"; message: string }
  | { type: "run"; run: string | null; status: Status | null; tasks: TaskInfo[] };

/** What the webview posts back: a step clicked (its `def` line, 1-based). */
/** ``ready``: the page listens (what was posted before its script ran is lost on a busy machine). */
export type FromWebview = { type: "ready" } | { type: "reveal"; line: number };

export function dagShape(graph: FlowGraph): DagShape {
  return { steps: Object.fromEntries(Object.entries(graph.steps).map(([name, step]) => [name, { type: step.type, next: step.next }])) };
}

export function badges(graph: FlowGraph): Record<string, string[]> {
  return Object.fromEntries(Object.entries(graph.steps).map(([name, step]) => [name, step.decorators]));
}

/** Whether `text` looks like a Metaflow flow (so the DAG is offered for it): it names FlowSpec. */
export function looksLikeFlow(text: string): boolean {
  return /\bFlowSpec\b/.test(text) && /@step\b/.test(text);
}

/** A function that runs `act` once `wait` ms after the last call (a keystroke burst makes one request). */
export function debounced<A extends unknown[]>(act: (...args: A) => void, wait: number): ((...args: A) => void) & { cancel(): void } {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const call = (...args: A) => {
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => act(...args), wait);
  };
  return Object.assign(call, { cancel: () => timer && clearTimeout(timer) });
}
