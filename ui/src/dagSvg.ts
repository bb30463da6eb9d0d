// The DAG as plain SVG elements (no framework): what the notebook's widget and the VS Code extension's webview
// draw, laid out by dag.ts as the UI's page is. Steps coloured by status, foreach items as cells, a step's
// badges (its decorators) beside its type.
import type { TaskInfo } from "./api";
import { type DagShape, ITEM_CELL, ITEMS_PER_ROW, layout, MAX_ITEM_CELLS, type StepCounts, stepStates } from "./dag";

export interface DrawOptions {
  /** The arrow marker's id: one per view, as several views can share a page. */
  arrowId: string;
  onStep?: (step: string) => void;
  onTask?: (step: string, task: TaskInfo) => void;
  /** Words drawn after a step's type, such as its decorators. */
  badges?: Record<string, string[]>;
  /** Each step's counts of all its tasks, where `tasks` holds only those to draw (the notebook's widget). */
  counts?: Record<string, StepCounts>;
}

const SVG = "http://www.w3.org/2000/svg";

export function svg<K extends keyof SVGElementTagNameMap>(tag: K, attributes: Record<string, string | number>): SVGElementTagNameMap[K] {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  return node;
}

export function element<K extends keyof HTMLElementTagNameMap>(tag: K, text?: string, className?: string): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

export function drawDag(graph: DagShape, tasks: TaskInfo[], options: DrawOptions): SVGSVGElement {
  const placed = layout(graph, stepStates(graph, tasks, options.counts));
  const root = svg("svg", { class: "dag", width: placed.width, height: placed.height, viewBox: `0 0 ${placed.width} ${placed.height}` });
  const marker = svg("marker", { id: options.arrowId, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow-head" }));
  const defs = svg("defs", {});
  defs.append(marker);
  root.append(defs);
  for (const edge of placed.edges) {
    const d = edge.points.map((p, i) => `${i === 0 ? "M" : "L"}${p.x},${p.y}`).join(" ");
    root.append(svg("path", { class: edge.foreach ? "edge edge-foreach" : "edge", "data-edge": `${edge.from}->${edge.to}`, d, "marker-end": `url(#${options.arrowId})` }));
  }
  for (const node of placed.nodes) {
    const group = svg("g", { class: `step status-${node.status}`, "data-step": node.name, "data-status": node.status, transform: `translate(${node.x},${node.y})` });
    group.append(svg("rect", { class: "step-box", width: node.width, height: node.height, rx: 8 }));
    const name = svg("text", { class: "step-name", x: 12, y: 22 });
    name.textContent = node.name;
    const meta = svg("text", { class: "step-meta", x: 12, y: 42, "data-counts": `${node.counts.completed}/${node.total}` });
    meta.textContent = [
      node.type.replace("split-", ""),
      ...(options.badges?.[node.name] ?? []).map((badge) => `@${badge}`),
      node.total > 0 ? `${node.counts.completed}/${node.total} done` : "",
      node.counts.failed > 0 ? `${node.counts.failed} failed` : "",
      node.counts.running > 0 ? `${node.counts.running} running` : "",
      node.retried > 0 ? `${node.retried} retried` : "",
    ].filter(Boolean).join(" · ");
    group.append(name, meta);
    const onStep = options.onStep;
    if (onStep) group.addEventListener("click", () => onStep(node.name));
    if (node.inForeach) {
      const items = svg("g", { class: "items", transform: "translate(12,54)", "data-items": node.total });
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
        const onTask = options.onTask;
        if (onTask) {
          cell.addEventListener("click", (event) => {
            event.stopPropagation();
            onTask(node.name, task);
          });
        }
        items.append(cell);
      });
      group.append(items);
    }
    root.append(group);
  }
  return root;
}

/** The drawing's look, scoped under `.mf-dag`; colours a host page may override through the variables. */
export const DAG_CSS = `
.mf-dag {
  --completed: #2e9e5b;
  --failed: #d64545;
  --running: #2f7fd8;
  --killed: #8a6d3b;
  --pending: #9aa4b1;
  --edge: #8892a0;
  font-family: system-ui, sans-serif;
  font-size: 13px;
}
.mf-dag .title { font-weight: 600; margin: 4px 0; }
.mf-dag .dag { max-width: 100%; height: auto; }
.mf-dag .edge { fill: none; stroke: var(--edge); stroke-width: 1.5; }
.mf-dag .edge-foreach { stroke-dasharray: 5 3; }
.mf-dag .arrow-head { fill: var(--edge); }
.mf-dag .step { cursor: pointer; }
.mf-dag .step-box { fill: transparent; stroke: var(--pending); stroke-width: 2; }
.mf-dag .step.status-completed .step-box { stroke: var(--completed); }
.mf-dag .step.status-failed .step-box { stroke: var(--failed); }
.mf-dag .step.status-killed .step-box { stroke: var(--killed); }
.mf-dag .step.status-running .step-box { stroke: var(--running); stroke-width: 3; }
.mf-dag .step-name { font-weight: 600; fill: currentColor; }
.mf-dag .step-meta { font-size: 11px; fill: var(--edge); }
.mf-dag .item { fill: var(--pending); cursor: pointer; }
.mf-dag .item.status-completed { fill: var(--completed); }
.mf-dag .item.status-failed { fill: var(--failed); }
.mf-dag .item.status-running { fill: var(--running); }
.mf-dag .item.status-killed { fill: var(--killed); }
.mf-dag .detail table { border-collapse: collapse; }
.mf-dag .detail td { padding: 1px 8px 1px 0; }
.mf-dag .detail .log { max-height: 14em; overflow: auto; font-size: 12px; }
.mf-dag .error { color: var(--failed); }
`;
