// The run's DAG: each step's state from its tasks, and a layout (dagre) to draw it.
import dagre from "@dagrejs/dagre";

import type { GraphStep, Status, TaskInfo } from "./api";

export type StepStatus = Status | "pending";

/** What drawing needs of a graph: each step's type and next steps (the UI's Graph, the notebook widget's). */
export interface DagShape {
  steps: Record<string, Pick<GraphStep, "type" | "next">>;
}

/** A step's tasks counted by status, with their total and retries: what the notebook's widget is sent beside
 * at most 400 of a step's tasks (metaflow_stack.notebook.progress.shown), so its totals count them all. */
export type StepCounts = Record<Status | "total" | "retried", number>;

export interface StepState {
  name: string;
  type: string;
  status: StepStatus;
  counts: Record<Status, number>;
  /** All the step's tasks, drawn or not. */
  total: number;
  /** Attempts after the first, over all the step's tasks. */
  retried: number;
  /** Those to draw (all of them, unless the step's counts were given). */
  tasks: TaskInfo[];
  /** Inside a foreach: its tasks are the items (with their foreach stacks). */
  inForeach: boolean;
}

export interface PlacedNode extends StepState {
  x: number;
  y: number;
  width: number;
  height: number;
}

export interface PlacedEdge {
  from: string;
  to: string;
  points: { x: number; y: number }[];
  /** The edge fans out into foreach items. */
  foreach: boolean;
}

export interface Layout {
  nodes: PlacedNode[];
  edges: PlacedEdge[];
  width: number;
  height: number;
}

/** A step's status from its tasks: running beats failed beats killed beats completed; no task yet is pending. */
export function aggregate(counts: Record<Status, number>): StepStatus {
  if (counts.running > 0) return "running";
  if (counts.failed > 0) return "failed";
  if (counts.killed > 0) return "killed";
  if (counts.completed > 0) return "completed";
  return "pending";
}

/** Each step's state from its tasks, or from its `counted` tasks where given (then `tasks` holds some of them). */
export function stepStates(graph: DagShape, tasks: TaskInfo[], counted: Record<string, StepCounts> = {}): StepState[] {
  const byStep = new Map<string, TaskInfo[]>();
  for (const task of tasks) {
    const list = byStep.get(task.step_name) ?? [];
    list.push(task);
    byStep.set(task.step_name, list);
  }
  return Object.entries(graph.steps).map(([name, step]) => {
    const own = byStep.get(name) ?? [];
    const { total, retried, ...counts } = counted[name] ?? count(own);
    return {
      name,
      type: step.type,
      status: aggregate(counts),
      counts,
      total,
      retried,
      tasks: own,
      inForeach: own.some((task) => task.foreach.length > 0),
    };
  });
}

function count(tasks: TaskInfo[]): StepCounts {
  const counts: StepCounts = { running: 0, completed: 0, failed: 0, killed: 0, total: tasks.length, retried: 0 };
  for (const task of tasks) {
    counts[task.status] += 1;
    counts.retried += task.attempt;
  }
  return counts;
}

const NODE_WIDTH = 190;

function nodeHeight(state: StepState): number {
  if (!state.inForeach) return 56;
  const rows = Math.ceil(Math.min(state.tasks.length, MAX_ITEM_CELLS) / ITEMS_PER_ROW);
  return 62 + rows * (ITEM_CELL + 2);
}

export const ITEMS_PER_ROW = 20;
export const ITEM_CELL = 7;
export const MAX_ITEM_CELLS = 400;

export function layout(graph: DagShape, states: StepState[]): Layout {
  const g = new dagre.graphlib.Graph();
  g.setGraph({ rankdir: "TB", nodesep: 40, ranksep: 46, marginx: 16, marginy: 16 });
  g.setDefaultEdgeLabel(() => ({}));
  const byName = new Map(states.map((state) => [state.name, state]));
  for (const state of states) g.setNode(state.name, { width: NODE_WIDTH, height: nodeHeight(state) });
  for (const [name, step] of Object.entries(graph.steps)) {
    for (const next of step.next) if (byName.has(next)) g.setEdge(name, next);
  }
  dagre.layout(g);
  const nodes = states.map((state) => {
    const placed = g.node(state.name);
    return { ...state, x: placed.x - placed.width / 2, y: placed.y - placed.height / 2, width: placed.width, height: placed.height };
  });
  const edges = g.edges().map((edge) => ({
    from: edge.v,
    to: edge.w,
    points: g.edge(edge).points,
    foreach: graph.steps[edge.v]?.type === "split-foreach",
  }));
  const size = g.graph();
  return { nodes, edges, width: size.width ?? 0, height: size.height ?? 0 };
}
