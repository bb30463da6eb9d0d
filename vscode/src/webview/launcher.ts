// The run launcher's form: a field per Parameter (its type, default as placeholder, help), the backends
// (the ones not usable here disabled, with their fix), and Run, which posts the values to the extension.
// The extension answers with the run's id, then how it finished, or why it did not start.
import { element } from "../../../ui/src/dagSvg";
import type { FromLauncher, ToLauncher } from "../launcherModel";
import { extensionHost } from "./host";

const vscode = extensionHost<FromLauncher>();
const root = document.getElementById("root") as HTMLElement;
document.head.append(
  element(
    "style",
    `body { color: var(--vscode-foreground); background: var(--vscode-editor-background); font-family: var(--vscode-font-family); }
label { display: block; margin: 0.6em 0 0.2em; font-weight: 600; }
input[type=text] { width: 100%; max-width: 32em; color: var(--vscode-input-foreground); background: var(--vscode-input-background); border: 1px solid var(--vscode-input-border, #888); padding: 3px 5px; }
.help, .fix, .state { color: var(--vscode-descriptionForeground); }
.fix { margin-left: 1.6em; font-size: 0.9em; }
.error { color: var(--vscode-errorForeground, #d64545); }
button { margin-top: 1em; color: var(--vscode-button-foreground); background: var(--vscode-button-background); border: none; padding: 5px 14px; cursor: pointer; }
button:disabled { opacity: 0.5; cursor: default; }`,
  ),
);

function form(message: Extract<ToLauncher, { type: "form" }>): void {
  const title = element("h2", `Run ${message.flow}`);
  const inputs = new Map<string, HTMLInputElement>();
  const fields = message.fields.map((field) => {
    const box = element("div", undefined, "field");
    const label = element("label", `${field.name} (${field.type})${field.required ? " *" : ""}`);
    const input = element("input");
    input.type = "text";
    input.name = field.name;
    input.id = `param-${field.name}`;
    input.placeholder = field.placeholder;
    label.htmlFor = input.id;
    inputs.set(field.name, input);
    box.append(label, input);
    if (field.help) box.append(element("div", field.help, "help"));
    return box;
  });
  const backends = element("fieldset", undefined, "backends");
  backends.append(element("legend", "Where the steps run"));
  for (const backend of message.backends) {
    const row = element("div", undefined, "backend");
    const radio = element("input");
    radio.type = "radio";
    radio.name = "backend";
    radio.value = backend.name;
    radio.id = `backend-${backend.name}`;
    radio.disabled = !backend.usable;
    radio.checked = backend.name === "local";
    const label = element("label", `${backend.name}: ${backend.detail}`);
    label.htmlFor = radio.id;
    label.style.display = "inline";
    row.append(radio, label);
    if (backend.fix) row.append(element("div", `not usable here: ${backend.fix}`, "fix"));
    backends.append(row);
  }
  const run = element("button", "Run");
  run.id = "run";
  const state = element("p", undefined, "state");
  state.id = "state";
  run.addEventListener("click", () => {
    const chosen = backends.querySelector<HTMLInputElement>("input[name=backend]:checked");
    const values = Object.fromEntries([...inputs].map(([name, input]) => [name, input.value.trim()]));
    run.disabled = true;
    state.className = "state";
    state.textContent = "starting ...";
    vscode.postMessage({ type: "launch", values, backend: chosen?.value ?? "local" });
  });
  root.replaceChildren(title, element("p", message.file, "help"), ...fields, backends, run, state);
}

window.addEventListener("message", (event: MessageEvent<ToLauncher>) => {
  const message = event.data;
  const state = document.getElementById("state");
  const run = document.getElementById("run") as HTMLButtonElement | null;
  if (message.type === "form") {
    form(message);
  } else if (state && run) {
    if (message.type === "launched") {
      state.textContent = `running: ${message.run}`;
      state.dataset.run = message.run;
    } else if (message.type === "finished") {
      state.textContent = `${state.dataset.run ?? "the run"} ${message.status} (exit ${message.returncode})`;
      run.disabled = false;
    } else {
      state.className = "state error";
      state.textContent = message.message;
      run.disabled = false;
    }
  }
});

vscode.postMessage({ type: "ready" }); // now listening: the extension posts the form
