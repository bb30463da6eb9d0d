// The webview's script: the flow's DAG drawn with the UI's layout and drawing (ui/src/dagSvg.ts), redrawn on
// each graph the extension posts; a broken buffer keeps the last good graph under its error line; a click on
// a step asks the extension to reveal its `def`.
import { DAG_CSS, drawDag, element } from "../../../ui/src/dagSvg";
import { badges, dagShape, type FromWebview, type ToWebview } from "../flowGraph";

interface VsCodeApi {
  postMessage(message: FromWebview): void;
}
declare function acquireVsCodeApi(): VsCodeApi;

const vscode = acquireVsCodeApi();
const root = document.getElementById("root") as HTMLElement;
const style = element("style", `${DAG_CSS}
body { color: var(--vscode-foreground); background: var(--vscode-editor-background); }
.mf-dag .step-name { fill: var(--vscode-foreground); }
.mf-dag .hint, .mf-dag .doc { color: var(--vscode-descriptionForeground); }
.mf-dag .error { color: var(--vscode-errorForeground, #d64545); }`);
document.head.append(style);

const title = element("div", undefined, "title");
const problem = element("p", undefined, "error");
const graph = element("div", undefined, "graph");
const parameters = element("ul", undefined, "parameters");
root.replaceChildren(title, problem, graph, parameters);

window.addEventListener("message", (event: MessageEvent<ToWebview>) => {
  const message = event.data;
  if (message.type === "error") {
    problem.textContent = message.message;
    problem.dataset.error = "true";
    return;
  }
  problem.textContent = "";
  delete problem.dataset.error;
  const flow = message.graph;
  title.textContent = `${flow.flow} · ${message.file}`;
  title.dataset.flow = flow.flow;
  const lines = Object.fromEntries(Object.entries(flow.steps).map(([name, step]) => [name, step.line]));
  graph.replaceChildren(
    drawDag(dagShape(flow), [], {
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
});
