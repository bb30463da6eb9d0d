// One-click debugging: CodeLenses "Debug step" above every step and "Debug flow" above the flow class, each
// starting the debugpy configuration the runtime generates (a step spun with Metaflow's spin on an earlier
// task's inputs; the flow with run), nothing hand-written; "Debug step on a run..." picks the run; a
// configuration can be saved into launch.json.
import * as vscode from "vscode";

import { type FlowGraph, looksLikeFlow } from "./flowGraph";
import { Refused } from "./helper";
import { lastPart, type RunList } from "./runsModel";
import { metaflowEnv, python, theHelper } from "./runtime";

/** The extension that runs ``type: debugpy`` configurations. */
const DEBUGGER = "ms-python.debugpy";

export interface DebugAnswer {
  configuration: vscode.DebugConfiguration;
  task: string | null;
}

export class StepLenses implements vscode.CodeLensProvider {
  async provideCodeLenses(document: vscode.TextDocument): Promise<vscode.CodeLens[]> {
    if (!looksLikeFlow(document.getText())) return [];
    let graph: FlowGraph;
    try {
      graph = await theHelper().request<FlowGraph>("graph", { path: document.uri.fsPath, source: document.getText() });
    } catch {
      return []; // a half-written buffer: the lenses come back when it parses
    }
    const at = (line: number) => new vscode.Range(line - 1, 0, line - 1, 0);
    const lenses = [
      new vscode.CodeLens(at(graph.line), { title: "Debug flow", command: "metaflowStack.debugFlow", arguments: [document.uri] }),
      new vscode.CodeLens(at(graph.line), { title: "Run flow...", command: "metaflowStack.runFlow", arguments: [document.uri] }),
    ];
    for (const [name, step] of Object.entries(graph.steps)) {
      lenses.push(
        new vscode.CodeLens(at(step.line), { title: "Debug step", command: "metaflowStack.debugStep", arguments: [document.uri, name] }),
        new vscode.CodeLens(at(step.line), { title: "on a run...", command: "metaflowStack.debugStepOnRun", arguments: [document.uri, name] }),
      );
    }
    return lenses;
  }
}

/** The runtime's configuration for ``step`` of the flow in ``uri`` (the whole flow when null). */
export async function debugConfiguration(uri: vscode.Uri, step: string | null, run: string | null = null): Promise<DebugAnswer> {
  const document = await vscode.workspace.openTextDocument(uri);
  return theHelper().request<DebugAnswer>("debug", { path: uri.fsPath, source: document.getText(), step, run, python: python() });
}

/** Start debugging; a step with no earlier task to spin on runs the whole flow, and says so. */
export async function startDebugging(uri: vscode.Uri, step: string | null, run: string | null = null): Promise<boolean> {
  if (!vscode.extensions.getExtension(DEBUGGER)) {
    void vscode.window.showErrorMessage(`Debugging a flow needs the Python Debugger extension (fix: install ${DEBUGGER}).`);
    return false;
  }
  try {
    const document = await vscode.workspace.openTextDocument(uri);
    if (document.isDirty) await document.save(); // spin and run load the file as saved
    const answer = await debugConfiguration(uri, step, run);
    withSettings(answer.configuration, uri);
    if (step !== null && answer.task === null) {
      void vscode.window.showInformationMessage(`No earlier run has a completed ${step} task to spin on: debugging the whole flow.`);
    }
    return await vscode.debug.startDebugging(vscode.workspace.getWorkspaceFolder(uri), answer.configuration);
  } catch (error) {
    void vscode.window.showErrorMessage(error instanceof Refused ? error.message : (error as Error).message);
    return false;
  }
}

/** The extension's Metaflow settings and the flow's workspace folder, as the helper found the task with. */
function withSettings(configuration: vscode.DebugConfiguration, uri: vscode.Uri): void {
  const env = metaflowEnv();
  if (Object.keys(env).length > 0) configuration.env = { ...(configuration.env ?? {}), ...env };
  const folder = vscode.workspace.getWorkspaceFolder(uri);
  if (folder) configuration.cwd = folder.uri.fsPath;
}

/** Let the user pick which of the flow's recent runs a step is spun on. */
export async function pickRun(uri: vscode.Uri): Promise<string | undefined> {
  const document = await vscode.workspace.openTextDocument(uri);
  const graph = await theHelper().request<FlowGraph>("graph", { path: uri.fsPath, source: document.getText() });
  const runs = await theHelper().request<RunList>("runs", { flow: graph.flow, limit: 50 });
  const picked = await vscode.window.showQuickPick(
    runs.runs.map((run) => ({ label: lastPart(run.pathspec), description: `${run.status} · ${new Date(run.started_at).toLocaleString()}`, run: run.pathspec })),
    { title: `Spin on which run of ${graph.flow}?` },
  );
  return picked?.run;
}

/** Add the configuration to the workspace's launch.json (replacing one of the same name). */
export async function saveConfiguration(uri: vscode.Uri, step: string | null): Promise<void> {
  const { configuration } = await debugConfiguration(uri, step);
  withSettings(configuration, uri);
  const launch = vscode.workspace.getConfiguration("launch", uri);
  const existing = (launch.get<vscode.DebugConfiguration[]>("configurations") ?? []).filter((c) => c.name !== configuration.name);
  await launch.update("configurations", [...existing, configuration], vscode.ConfigurationTarget.WorkspaceFolder);
  void vscode.window.showInformationMessage(`Saved "${configuration.name}" in launch.json.`);
}
