// The runs sidebar's model, apart from VS Code: what the helper answers (the agent's bounded listings), the
// tree's nodes Flow > Run > Step > Task > Artifact, how each is labelled, and the filters. The tree view
// (runsTree.ts) only turns these nodes into TreeItems.
import type { Artifact, RunInfo, RunSummary, Status, StepCounts, TaskInfo } from "../../ui/src/api";
import { bytes, duration } from "../../ui/src/format";

export type { RunInfo, RunSummary };
/** An artifact as the agent lists it (the UI's, without its inline preview). */
export type ArtifactInfo = Omit<Artifact, "preview">;

export interface Page {
  truncated: boolean;
  next_cursor: string | null;
}
export interface FlowInfo {
  name: string;
  created_at: number;
}
export type FlowList = Page & { flows: FlowInfo[] };
export type RunList = Page & { runs: RunInfo[] };
export type TaskList = Page & { tasks: TaskInfo[] };
export type ArtifactList = Page & { artifacts: ArtifactInfo[] };

/** What the sidebar shows: one status (or all), runs carrying every tag, and only the user's own. */
export interface Filters {
  status: Status | null;
  tags: string[];
  mine: boolean;
}

export const NO_FILTERS: Filters = { status: null, tags: [], mine: false };

export type Node =
  | { kind: "flow"; flow: string }
  | { kind: "run"; run: RunInfo }
  | { kind: "step"; run: string; step: StepCounts }
  | { kind: "task"; task: TaskInfo }
  | { kind: "artifact"; artifact: ArtifactInfo }
  | { kind: "more"; parent: Node | null; cursor: string }
  | { kind: "message"; text: string };

export interface Shown {
  label: string;
  description?: string;
  tooltip?: string;
  /** A codicon id (VS Code's built-in icons), coloured by status where it has one. */
  icon: string;
  expandable: boolean;
  /** For menus (`viewItem == ...` in package.json). */
  context: string;
}

/** Codicons for each status, as the UI colours them: green done, red failed, spinning while running. */
export const STATUS_ICONS: Record<Status | "pending", string> = {
  completed: "pass",
  failed: "error",
  running: "sync~spin",
  killed: "circle-slash",
  pending: "circle-outline",
};

export function since(epochMs: number, now: number = Date.now()): string {
  const seconds = Math.max(0, Math.round((now - epochMs) / 1000));
  if (seconds < 60) return `${seconds}s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h ago`;
  return `${Math.floor(seconds / 86400)}d ago`;
}

/** The last part of a pathspec (a run's id, a task's id). */
export function lastPart(pathspec: string): string {
  return pathspec.slice(pathspec.lastIndexOf("/") + 1);
}

/** How a node looks in the tree. */
export function shown(node: Node, now: number = Date.now()): Shown {
  switch (node.kind) {
    case "flow":
      return { label: node.flow, icon: "symbol-class", expandable: true, context: "flow" };
    case "run": {
      const { run } = node;
      const tags = run.tags.length > 0 ? ` · ${run.tags.join(", ")}` : "";
      return {
        label: lastPart(run.pathspec),
        description: `${run.status} · ${since(run.started_at, now)}${run.user ? ` · ${run.user}` : ""}${tags}`,
        tooltip: `${run.pathspec}\n${run.status}${run.finished_at ? ` in ${duration(run.finished_at - run.started_at)}` : ""}`,
        icon: STATUS_ICONS[run.status],
        expandable: true,
        context: "run",
      };
    }
    case "step": {
      const { step } = node;
      const status: Status | "pending" = step.failed > 0 ? "failed" : step.running > 0 ? "running" : step.killed > 0 ? "killed" : step.completed > 0 ? "completed" : "pending";
      return {
        label: step.step_name,
        description: `${step.completed}/${step.total} done${step.failed ? ` · ${step.failed} failed` : ""}${step.running ? ` · ${step.running} running` : ""}`,
        icon: STATUS_ICONS[status],
        expandable: true,
        context: "step",
      };
    }
    case "task": {
      const { task } = node;
      const items = task.foreach.length > 0 ? ` · ${task.foreach.join(", ")}` : "";
      return {
        label: lastPart(task.pathspec),
        description: `${task.status}${task.attempt > 0 ? ` · attempt ${task.attempt}` : ""}${items}`,
        tooltip: `${task.pathspec}${task.finished_at ? `\n${duration(task.finished_at - task.started_at)}` : ""}`,
        icon: STATUS_ICONS[task.status],
        expandable: true,
        context: "task",
      };
    }
    case "artifact": {
      const { artifact } = node;
      return {
        label: artifact.name,
        description: [artifact.python_type, artifact.size === null ? null : bytes(artifact.size)].filter(Boolean).join(" · "),
        tooltip: `${artifact.pathspec}/${artifact.name}`,
        icon: "symbol-variable",
        expandable: false,
        context: "artifact",
      };
    }
    case "more":
      return { label: "Load more...", icon: "ellipsis", expandable: false, context: "more" };
    case "message":
      return { label: node.text, icon: "info", expandable: false, context: "message" };
  }
}

/** The helper's parameters for a run listing under ``filters`` (``user``: who "mine" is). */
export function runQuery(flow: string, filters: Filters, user: string | null, cursor: string | null): Record<string, unknown> {
  return {
    flow,
    status: filters.status,
    tags: filters.tags,
    user: filters.mine ? user : null,
    limit: 100,
    cursor,
  };
}

/** Artifacts as the sidebar lists them: the user's first, by name; Metaflow's own (``_task_ok``...) after. */
export function ordered(artifacts: ArtifactInfo[]): ArtifactInfo[] {
  const own = (name: string) => (name.startsWith("_") ? 1 : 0);
  return [...artifacts].sort((a, b) => own(a.name) - own(b.name) || a.name.localeCompare(b.name));
}

/** The filters as one line (the view's description), empty when there are none. */
export function describeFilters(filters: Filters): string {
  return [filters.status, ...filters.tags.map((tag) => `#${tag}`), filters.mine ? "mine" : null].filter(Boolean).join(" · ");
}

/** The pathspec a node stands for (what "Copy pathspec" copies). */
export function pathspecOf(node: Node): string | null {
  switch (node.kind) {
    case "flow":
      return node.flow;
    case "run":
      return node.run.pathspec;
    case "step":
      return `${node.run}/${node.step.step_name}`;
    case "task":
      return node.task.pathspec;
    case "artifact":
      return `${node.artifact.pathspec}/${node.artifact.name}`;
    default:
      return null;
  }
}

/** The Client API lines that load what a node stands for (in every namespace: the run may be another user's). */
export function clientSnippet(node: Node): string | null {
  const load = (kind: string, line: string) => `from metaflow import ${kind}, namespace\nnamespace(None)\n${line}`;
  switch (node.kind) {
    case "flow":
      return load("Flow", `flow = Flow("${node.flow}")`);
    case "run":
      return load("Run", `run = Run("${node.run.pathspec}")`);
    case "step":
      return load("Step", `step = Step("${node.run}/${node.step.step_name}")`);
    case "task":
      return load("Task", `task = Task("${node.task.pathspec}")`);
    case "artifact":
      return load("Task", `${node.artifact.name} = Task("${node.artifact.pathspec}")["${node.artifact.name}"].data`);
    default:
      return null;
  }
}
