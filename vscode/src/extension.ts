// Metaflow Stack for VS Code: the live DAG of the flow being edited (with a run's statuses over it), the
// runs sidebar, one-click step debugging, the run launcher, card previews and where runs are read from.
import * as vscode from "vscode";

import { showCards } from "./cards";
import { DagPanel } from "./dagPanel";
import { pickRun, saveConfiguration, StepLenses, startDebugging } from "./debugging";
import { Refused } from "./helper";
import { Launcher } from "./launcher";
import { clientSnippet, type Filters, type Node, pathspecOf } from "./runsModel";
import { RunsTree } from "./runsTree";
import { restartHelper, SETTINGS, theHelper } from "./runtime";
import { describeWhere, statusItem } from "./statusBar";

const STATUSES = ["running", "completed", "failed", "killed"] as const;

function flowEditor(): vscode.TextEditor | undefined {
  const editor = vscode.window.activeTextEditor;
  if (!editor || editor.document.languageId !== "python") {
    void vscode.window.showInformationMessage("Open a Metaflow flow (a Python file) first.");
    return undefined;
  }
  return editor;
}

async function documentOf(uri?: vscode.Uri): Promise<vscode.TextDocument | undefined> {
  if (uri instanceof vscode.Uri) return vscode.workspace.openTextDocument(uri);
  return flowEditor()?.document;
}

function problem(error: unknown): string {
  return error instanceof Refused ? error.message : (error as Error).message;
}

async function chooseFilters(current: Filters): Promise<Filters | undefined> {
  const status = await vscode.window.showQuickPick(["any status", ...STATUSES], { title: "Runs with status", placeHolder: current.status ?? "any status" });
  if (status === undefined) return undefined;
  const tags = await vscode.window.showInputBox({ title: "Runs with every one of these tags (comma-separated; empty for any)", value: current.tags.join(", ") });
  if (tags === undefined) return undefined;
  const mine = await vscode.window.showQuickPick(["everyone's runs", "only mine"], { title: "Whose runs" });
  if (mine === undefined) return undefined;
  return {
    status: status === "any status" ? null : (status as Filters["status"]),
    tags: tags.split(",").map((tag) => tag.trim()).filter(Boolean),
    mine: mine === "only mine",
  };
}

export function activate(context: vscode.ExtensionContext): void {
  const output = vscode.window.createOutputChannel("Metaflow Runs");
  const tree = new RunsTree();
  const view = vscode.window.createTreeView("metaflowStack.runs", { treeDataProvider: tree, showCollapseAll: true });
  tree.view = view;
  const where = statusItem();
  void describeWhere(where);

  const dagFor = async (document: vscode.TextDocument) => DagPanel.show(context, document);
  const watcher = vscode.workspace.createFileSystemWatcher("**/.metaflow/*/*/_meta/_self.json");

  context.subscriptions.push(
    output,
    tree,
    view,
    where,
    watcher,
    watcher.onDidCreate(() => tree.refresh()),
    vscode.languages.registerCodeLensProvider({ language: "python" }, new StepLenses()),
    vscode.commands.registerCommand("metaflowStack.showDag", async () => {
      const editor = flowEditor();
      if (editor) await dagFor(editor.document);
    }),
    vscode.commands.registerCommand("metaflowStack.runFlow", async (uri?: vscode.Uri) => {
      const document = await documentOf(uri);
      if (!document) return;
      Launcher.show(context, document, output, (run) => {
        void dagFor(document).then((panel) => panel.showRun(run));
        tree.refresh();
      });
    }),
    vscode.commands.registerCommand("metaflowStack.debugStep", (uri: vscode.Uri, step: string) => startDebugging(uri, step)),
    vscode.commands.registerCommand("metaflowStack.debugStepOnRun", async (uri: vscode.Uri, step: string) => {
      try {
        const run = await pickRun(uri);
        if (run) await startDebugging(uri, step, run);
      } catch (error) {
        void vscode.window.showErrorMessage(problem(error));
      }
    }),
    vscode.commands.registerCommand("metaflowStack.debugFlow", async (uri?: vscode.Uri) => {
      const document = await documentOf(uri);
      if (document) await startDebugging(document.uri, null);
    }),
    vscode.commands.registerCommand("metaflowStack.saveDebugConfiguration", async (uri?: vscode.Uri) => {
      const document = await documentOf(uri);
      if (!document) return;
      try {
        await saveConfiguration(document.uri, null);
      } catch (error) {
        void vscode.window.showErrorMessage(problem(error));
      }
    }),
    vscode.commands.registerCommand("metaflowStack.refreshRuns", () => tree.refresh()),
    vscode.commands.registerCommand("metaflowStack.filterRuns", async () => {
      const filters = await chooseFilters(tree.filters);
      if (filters) tree.setFilters(filters);
    }),
    vscode.commands.registerCommand("metaflowStack.loadMore", (node: Extract<Node, { kind: "more" }>) => tree.loadMore(node)),
    vscode.commands.registerCommand("metaflowStack.copyPathspec", async (node: Node) => {
      const pathspec = pathspecOf(node);
      if (pathspec) await vscode.env.clipboard.writeText(pathspec);
    }),
    vscode.commands.registerCommand("metaflowStack.copySnippet", async (node: Node) => {
      const snippet = clientSnippet(node);
      if (snippet) await vscode.env.clipboard.writeText(snippet);
    }),
    vscode.commands.registerCommand("metaflowStack.previewArtifact", async (node: Node, full = false) => {
      if (node.kind !== "artifact") return;
      try {
        const found = await theHelper().request<{ preview: string }>("preview", { task: node.artifact.pathspec, name: node.artifact.name, full });
        const header = `# ${node.artifact.pathspec}/${node.artifact.name} (${node.artifact.python_type ?? "?"})\n# ${full ? "the whole value" : "a preview: Open Whole Value for all of it"}\n`;
        const document = await vscode.workspace.openTextDocument({ content: header + found.preview, language: "python" });
        await vscode.window.showTextDocument(document, { preview: true, viewColumn: vscode.ViewColumn.Beside });
      } catch (error) {
        void vscode.window.showErrorMessage(problem(error));
      }
    }),
    vscode.commands.registerCommand("metaflowStack.openArtifact", (node: Node) => vscode.commands.executeCommand("metaflowStack.previewArtifact", node, true)),
    vscode.commands.registerCommand("metaflowStack.showCards", (node: Node) => {
      if (node.kind === "task") showCards(context, node.task.pathspec);
    }),
    vscode.commands.registerCommand("metaflowStack.showRunOnDag", async (node: Node) => {
      const editor = flowEditor();
      if (node.kind === "run" && editor) (await dagFor(editor.document)).showRun(node.run.pathspec);
    }),
    vscode.commands.registerCommand("metaflowStack.reconnect", async () => {
      try {
        await theHelper().request("reconnect", {});
      } catch (error) {
        void vscode.window.showErrorMessage(problem(error));
      }
      tree.reset();
      await describeWhere(where);
    }),
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (SETTINGS.some((setting) => event.affectsConfiguration(setting))) {
        restartHelper();
        tree.reset();
        void describeWhere(where);
      }
    }),
    { dispose: restartHelper },
  );
}

export function deactivate(): void {
  restartHelper();
}
