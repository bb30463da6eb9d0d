// The notebook's live DAG (metaflow_stack.notebook.widget): an anywidget front end, drawn with the UI's
// own layout, redrawn whenever the kernel sends new task states; a click asks the kernel for a task's
// artifacts and log tail.
import type { Status, TaskInfo } from "../api";
import { type DagShape, ITEM_CELL, ITEMS_PER_ROW, layout, MAX_ITEM_CELLS, stepStates } from "../dag";
import css from "./widget.css?inline";

/** The part of anywidget's model this widget uses (its documented front-end API). */
interface Model {
  get(name: "graph"): DagShape;
  get(name: "tasks"): TaskInfo[];
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

const SVG = "http://www.w3.org/2000/svg";

function svg<K extends keyof SVGElementTagNameMap>(tag: K, attributes: Record<string, string | number>): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  return node;
}

function element<K extends keyof HTMLElementTagNameMap>(tag: K, text?: string, className?: string): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function sizeText(size: number | null): string {
  if (size === null) return "";
  if (size < 1024) return `${size} B`;
  if (size < 1024 * 1024) return `${(size / 1024).toFixed(1)} KiB`;
  return `${(size / 1024 / 1024).toFixed(1)} MiB`;
}

let views = 0;

function drawGraph(model: Model, select: (selection: Selection) => void, arrow: string): SVGSVGElement {
  const graph = model.get("graph");
  const placed = layout(graph, stepStates(graph, model.get("tasks")));
  const root = svg("svg", { class: "dag", width: placed.width, height: placed.height, viewBox: `0 0 ${placed.width} ${placed.height}` });
  const marker = svg("marker", { id: arrow, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow-head" }));
  const defs = svg("defs", {});
  defs.append(marker);
  root.append(defs);
  for (const edge of placed.edges) {
    const d = edge.points.map((p, i) => `${i === 0 ? "M" : "L"}${p.x},${p.y}`).join(" ");
    root.append(svg("path", { class: edge.foreach ? "edge edge-foreach" : "edge", "data-edge": `${edge.from}->${edge.to}`, d, "marker-end": `url(#${arrow})` }));
  }
  for (const node of placed.nodes) {
    const group = svg("g", { class: `step status-${node.status}`, "data-step": node.name, "data-status": node.status, transform: `translate(${node.x},${node.y})` });
    group.append(svg("rect", { class: "step-box", width: node.width, height: node.height, rx: 8 }));
    const name = svg("text", { class: "step-name", x: 12, y: 22 });
    name.textContent = node.name;
    const retries = node.tasks.reduce((sum, task) => sum + task.attempt, 0);
    const meta = svg("text", { class: "step-meta", x: 12, y: 42, "data-counts": `${node.counts.completed}/${node.tasks.length}` });
    meta.textContent = [
      node.type.replace("split-", ""),
      node.tasks.length > 0 ? `${node.counts.completed}/${node.tasks.length} done` : "",
      node.counts.failed > 0 ? `${node.counts.failed} failed` : "",
      node.counts.running > 0 ? `${node.counts.running} running` : "",
      retries > 0 ? `${retries} retried` : "",
    ].filter(Boolean).join(" · ");
    group.append(name, meta);
    group.addEventListener("click", () => select({ type: "select", step: node.name }));
    if (node.inForeach) {
      const items = svg("g", { class: "items", transform: "translate(12,54)", "data-items": node.tasks.length });
      node.tasks.slice(0, MAX_ITEM_CELLS).forEach((task, i) => {
        const cell = svg("rect", {
          class: `item status-${task.status}`,
          "data-task": task.pathspec,
          x: (i % ITEMS_PER_ROW) * (ITEM_CELL + 1.5),
          y: Math.floor(i / ITEMS_PER_ROW) * (ITEM_CELL + 2),
          width: ITEM_CELL,
          height: ITEM_CELL,
        });
        const title = svg("title", {});
        title.textContent = `${task.status} · ${task.pathspec}`;
        cell.append(title);
        cell.addEventListener("click", (event) => {
          event.stopPropagation();
          select({ type: "select", step: node.name, task: task.pathspec });
        });
        items.append(cell);
      });
      group.append(items);
    }
    root.append(group);
  }
  return root;
}

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
  const style = element("style", css);
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
    graph.replaceChildren(drawGraph(model, select, arrow));
  };
  const drawDetail = () => detail.replaceChildren(detailPanel(model.get("detail")));
  drawRun();
  drawDetail();
  const runEvents = ["change:tasks", "change:state", "change:run", "change:graph"];
  for (const event of runEvents) model.on(event, drawRun);
  model.on("change:detail", drawDetail);
  return () => {
    for (const event of runEvents) model.off(event, drawRun);
    model.off("change:detail", drawDetail);
  };
}

export default { render };
