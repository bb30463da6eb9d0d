// The notebook's live DAG (metaflow_stack.notebook.widget): an anywidget front end, drawn with the UI's
// own layout, redrawn whenever the kernel sends new task states; a click asks the kernel for a task's
// artifacts and log tail.
import type { Status, TaskInfo } from "../api";
import type { DagShape, StepCounts } from "../dag";
import { DAG_CSS, drawDag, element } from "../dagSvg";

/** The part of anywidget's model this widget uses (its documented front-end API). */
interface Model {
  get(name: "graph"): DagShape;
  get(name: "tasks"): TaskInfo[];
  get(name: "counts"): Record<string, StepCounts>;
  get(name: "run" | "state"): string;
  get(name: "detail"): Detail;
  on(event: string, callback: () => void): void;
  off(event: string, callback: () => void): void;
  send(content: Selection): void;
}

interface Selection {
  type: "select";
  step: string;
  task?: string;
}

interface Detail {
  error?: string;
  step?: string;
  task?: string;
  artifacts?: { name: string; type: string | null; size: number | null }[];
  /** More artifacts than listed. */
  more?: boolean;
  stdout?: string[];
  stderr?: string[];
  show?: string;
}

function sizeText(size: number | null): string {
  if (size === null) return "";
  if (size < 1024) return `${size} B`;
  if (size < 1024 * 1024) return `${(size / 1024).toFixed(1)} KiB`;
  return `${(size / 1024 / 1024).toFixed(1)} MiB`;
}

let views = 0;

function detailPanel(detail: Detail): HTMLElement {
  const panel = element("div", undefined, "detail");
  panel.dataset.detail = detail.task ?? detail.step ?? "";
  if (detail.error) {
    panel.append(element("p", detail.error, "error"));
    return panel;
  }
  if (!detail.task) return panel;
  panel.append(element("h4", detail.task));
  const table = element("table", undefined, "artifacts");
  for (const artifact of detail.artifacts ?? []) {
    const row = element("tr");
    row.dataset.artifact = artifact.name;
    row.append(element("td", artifact.name), element("td", artifact.type ?? ""), element("td", sizeText(artifact.size)));
    table.append(row);
  }
  panel.append(table);
  if (detail.more) panel.append(element("p", "(more artifacts than listed)", "hint"));
  if (detail.show) panel.append(element("p", `show a value: ${detail.show}`, "hint"));
  for (const stream of ["stdout", "stderr"] as const) {
    const lines = detail[stream] ?? [];
    if (lines.length === 0) continue;
    const log = element("pre", lines.join("\n"), "log");
    log.dataset.stream = stream;
    panel.append(element("h5", stream), log);
  }
  return panel;
}

/** The run's state as the title colours it (a refused run failed; an interrupted one was killed). */
const STATES: Record<string, Status | "pending"> = {
  starting: "pending",
  running: "running",
  completed: "completed",
  failed: "failed",
  refused: "failed",
  interrupted: "killed",
};

function render({ model, el }: { model: Model; el: HTMLElement }): () => void {
  const arrow = `mf-arrow-${++views}`; // one marker id per view: several views of a run share a page
  const style = element("style", DAG_CSS);
  const root = element("div", undefined, "mf-dag");
  const title = element("div", undefined, "title");
  const graph = element("div", undefined, "graph");
  const detail = element("div");
  root.append(title, graph, detail);
  el.append(style, root);
  const select = (selection: Selection) => {
    model.send(selection);
    // The kernel answers once the cell running the flow is done (it runs one cell at a time).
    if (model.get("state") === "running") detail.replaceChildren(element("p", "details when the run ends ...", "hint"));
  };
  const drawRun = () => {
    const state = model.get("state");
    title.textContent = `${model.get("run") || "starting"}: ${state}`;
    title.className = `title status-${STATES[state] ?? "pending"}`;
    title.dataset.state = state;
    const drawn = drawDag(model.get("graph"), model.get("tasks"), {
      arrowId: arrow,
      counts: model.get("counts"),
      onStep: (step) => select({ type: "select", step }),
      onTask: (step, task) => select({ type: "select", step, task: task.pathspec }),
    });
    graph.replaceChildren(drawn);
  };
  const drawDetail = () => detail.replaceChildren(detailPanel(model.get("detail")));
  drawRun();
  drawDetail();
  const runEvents = ["change:tasks", "change:counts", "change:state", "change:run", "change:graph"];
  for (const event of runEvents) model.on(event, drawRun);
  model.on("change:detail", drawDetail);
  return () => {
    for (const event of runEvents) model.off(event, drawRun);
    model.off("change:detail", drawDetail);
  };
}

export default { render };
