// Runs inside VS Code's extension host (runTests.ts starts it): the extension activates on a flow, offers
// "Debug step" above each step, and its generated configuration stops, in the real Python Debugger, at a
// breakpoint in a step body spun on the inputs of the workspace's earlier run; the DAG command opens its panel.
import assert from "node:assert/strict";
import * as vscode from "vscode";

/** Seconds a debug session may take to stop (spin imports Metaflow and the flow, in a child process). */
const STOP_S = 180;

function stopped(): Promise<{ session: vscode.DebugSession; threadId: number }> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no breakpoint stop in ${STOP_S} s`)), STOP_S * 1000);
    const factory = vscode.debug.registerDebugAdapterTrackerFactory("debugpy", {
      createDebugAdapterTracker: (session) => ({
        onDidSendMessage: (message: { type?: string; event?: string; body?: { reason?: string; threadId?: number } }) => {
          if (message.type === "event" && message.event === "stopped" && message.body?.reason === "breakpoint") {
            clearTimeout(timer);
            factory.dispose();
            resolve({ session, threadId: message.body.threadId ?? 0 });
          }
        },
      }),
    });
  });
}

/** The labels of the open tabs once one reads `label`, or after `seconds`: the extension host learns of a
 * tab from VS Code's main process some messages after the command that opened it has returned. */
async function tabsOnce(label: string, seconds: number): Promise<string[]> {
  const labels = () => vscode.window.tabGroups.all.flatMap((group) => group.tabs).map((tab) => tab.label);
  const deadline = Date.now() + seconds * 1000;
  while (!labels().includes(label) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return labels();
}

async function debugStepStopsInItsBody(folder: vscode.WorkspaceFolder): Promise<void> {
  const uri = vscode.Uri.joinPath(folder.uri, "foreach_flow.py");
  const document = await vscode.workspace.openTextDocument(uri);
  await vscode.window.showTextDocument(document);
  // Opening a Python file activates the extension (onLanguage:python), without waiting for it: wait here.
  await vscode.extensions.getExtension("metaflow-stack.metaflow-stack")?.activate();
  const body = document.getText().split("\n").findIndex((line) => line.includes("self.value = self.input * self.input"));
  assert.ok(body > 0, "the flow's square step body");

  const lenses = await vscode.commands.executeCommand<vscode.CodeLens[]>("vscode.executeCodeLensProvider", uri);
  const titles = lenses.map((lens) => `${lens.range.start.line}:${lens.command?.title}`);
  const square = document.getText().split("\n").findIndex((line) => line.includes("def square(self)"));
  assert.ok(titles.includes(`${square}:Debug step`), `a Debug step lens above square: ${titles.join(", ")}`);

  vscode.debug.addBreakpoints([new vscode.SourceBreakpoint(new vscode.Location(uri, new vscode.Position(body, 0)))]);
  const stop = stopped();
  assert.ok(await vscode.commands.executeCommand<boolean>("metaflowStack.debugStep", uri, "square"), "debugging started");
  const { session, threadId } = await stop;
  const trace = await session.customRequest("stackTrace", { threadId, levels: 1 });
  const frame = trace.stackFrames[0] as { name: string; line: number };
  assert.deepEqual([frame.name, frame.line], ["square", body + 1]);
  await vscode.debug.stopDebugging();
}

async function theDagOpensBesideTheFlow(): Promise<void> {
  await vscode.commands.executeCommand("metaflowStack.showDag");
  const open = await tabsOnce("Metaflow DAG", 10);
  assert.ok(open.includes("Metaflow DAG"), `the DAG's tab: ${open.join(", ")}`);
}

export async function run(): Promise<void> {
  const folder = vscode.workspace.workspaceFolders?.[0];
  assert.ok(folder, "runTests opens the prepared workspace");
  for (const test of [debugStepStopsInItsBody, theDagOpensBesideTheFlow]) {
    console.log(`# ${test.name}`);
    await test(folder);
    console.log(`ok ${test.name}`);
  }
}
