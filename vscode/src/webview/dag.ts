// The webview's script: the flow's DAG drawn with the UI's layout and drawing (ui/src/dagSvg.ts), redrawn on
// each graph the extension posts; a broken buffer keeps the last good graph under its error line; a run's
// tasks, when the extension posts them, colour the steps by status (the overlay); a click on a step asks
// the extension to reveal its `def`.
import type { TaskInfo } from "../../../ui/src/api";
import { DAG_CSS, drawDag, element } from "../../../ui/src/dagSvg";
import { badges, dagShape, type FlowGraph, type FromWebview, type ToWebview } from "../flowGraph";
import { extensionHost } from "./host";

const vscode = extensionHost<FromWebview>();
const root = document.getElementById("root") as HTMLElement;
const style = element("style", `${DAG_CSS}
body { color: var(--vscode-foreground); background: var(--vscode-editor-background); }
.mf-dag .step-name { fill: var(--vscode-foreground); }
.mf-dag .hint, .mf-dag .doc, .mf-dag .run { color: var(--vscode-descriptionForeground); }
.mf-dag .error { color: var(--vscode-errorForeground, #d64545); }`);
document.head.append(style);

const title = element("div", undefined, "title");
const problem = element("p", undefined, "error");
const run = element("p", undefined, "run");
const graph = element("div", undefined, "graph");
const parameters = element("ul", undefined, "parameters");
root.replaceChildren(title, problem, run, graph, parameters);

let drawn: { flow: FlowGraph; file: string } | undefined;
let overlay: TaskInfo[] = [];

function draw(): void {
  if (!drawn) return;
  const { flow, file } = drawn;
  title.textContent = `${flow.flow} · ${file}`;
  title.dataset.flow = flow.flow;
  const lines = Object.fromEntries(Object.entries(flow.steps).map(([name, step]) => [name, step.line]));
  // Only this flow's tasks, of steps it still has (a step renamed since the run is left uncoloured).
  const known = overlay.filter((task) => task.pathspec.startsWith(`${flow.flow}/`) && task.step_name in flow.steps);
  graph.replaceChildren(
    drawDag(dagShape(flow), known, {
      arrowId: "mf-arrow",
      badges: badges(flow),
      onStep: (step) => vscode.postMessage({ type: "reveal", line: lines[step] ?? flow.line }),
    }),
  );
  parameters.replaceChildren(
    ...flow.parameters.map((parameter) => {
      const item = element("li", `${parameter.name ?? parameter.attribute} = ${parameter.default ?? "(required)"}${parameter.help ? ` — ${parameter.help}` : ""}`);
      item.dataset.parameter = parameter.name ?? parameter.attribute;
      return item;
    }),
  );
}

window.addEventListener("message", (event: MessageEvent<ToWebview>) => {
  const message = event.data;
  if (message.type === "error") {
    problem.textContent = message.message;
    problem.dataset.error = "true";
    return;
  }
  if (message.type === "run") {
    overlay = message.tasks;
    run.textContent = message.run ? `run ${message.run}: ${message.status ?? "starting"}` : "";
    run.dataset.run = message.run ?? "";
    run.dataset.status = message.status ?? "";
    draw();
    return;
  }
  problem.textContent = "";
  delete problem.dataset.error;
  drawn = { flow: message.graph, file: message.file };
  draw();
});

vscode.postMessage({ type: "ready" }); // now listening: the extension posts the graph (and a run's overlay)
