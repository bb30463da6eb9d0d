// Metaflow Stack for VS Code: the DAG of the flow being edited, beside it, redrawn as the user types.
import { randomBytes } from "node:crypto";
import * as path from "node:path";
import * as vscode from "vscode";

import { debounced, type FlowGraph, type FromWebview, looksLikeFlow, type ToWebview, webviewHtml } from "./flowGraph";
import { Helper, Refused } from "./helper";

/** Milliseconds after the last keystroke before the graph is asked for again. */
const TYPING_PAUSE = 120;

let helper: Helper | undefined;

function python(): string {
  const configured = vscode.workspace.getConfiguration("metaflowStack").get<string>("python");
  if (configured) return configured;
  const fromPythonExtension = vscode.workspace.getConfiguration("python").get<string>("defaultInterpreterPath");
  return fromPythonExtension && fromPythonExtension !== "python" ? fromPythonExtension : "python3";
}

function theHelper(): Helper {
  helper ??= new Helper(python(), vscode.workspace.workspaceFolders?.[0]?.uri.fsPath);
  return helper;
}

/** One panel beside the editor, following the flow document it was opened for. */
class DagPanel {
  private static current: DagPanel | undefined;
  private readonly disposables: vscode.Disposable[] = [];
  private readonly refresh = debounced(() => void this.draw(), TYPING_PAUSE);

  static show(context: vscode.ExtensionContext, document: vscode.TextDocument): void {
    if (DagPanel.current) {
      DagPanel.current.follow(document);
      DagPanel.current.panel.reveal(vscode.ViewColumn.Beside, true);
      return;
    }
    const panel = vscode.window.createWebviewPanel("metaflowStack.dag", "Metaflow DAG", { viewColumn: vscode.ViewColumn.Beside, preserveFocus: true }, {
      enableScripts: true,
      localResourceRoots: [vscode.Uri.joinPath(context.extensionUri, "dist")],
    });
    DagPanel.current = new DagPanel(context, panel, document);
  }

  private constructor(
    context: vscode.ExtensionContext,
    readonly panel: vscode.WebviewPanel,
    private document: vscode.TextDocument,
  ) {
    const script = panel.webview.asWebviewUri(vscode.Uri.joinPath(context.extensionUri, "dist", "webview.js"));
    panel.webview.html = webviewHtml(script.toString(), panel.webview.cspSource, randomBytes(16).toString("base64"));
    this.disposables.push(
      vscode.workspace.onDidChangeTextDocument((event) => {
        if (event.document === this.document) this.refresh();
      }),
      vscode.window.onDidChangeActiveTextEditor((editor) => {
        if (editor && editor.document.languageId === "python" && looksLikeFlow(editor.document.getText())) this.follow(editor.document);
      }),
      panel.webview.onDidReceiveMessage((message: FromWebview) => this.reveal(message)),
      panel.onDidDispose(() => this.dispose()),
    );
    void this.draw();
  }

  private follow(document: vscode.TextDocument): void {
    if (document === this.document) return;
    this.document = document;
    void this.draw();
  }

  private async draw(): Promise<void> {
    const file = this.document.uri.fsPath;
    let message: ToWebview;
    try {
      const graph = await theHelper().request<FlowGraph>("graph", { path: file, source: this.document.getText() });
      message = { type: "graph", graph, file: path.basename(file) };
    } catch (error) {
      message = { type: "error", message: error instanceof Refused ? error.message : `${(error as Error).message}` };
    }
    await this.panel.webview.postMessage(message);
  }

  private reveal(message: FromWebview): void {
    if (message.type !== "reveal" || !Number.isInteger(message.line) || message.line < 1) return;
    const line = Math.min(message.line, this.document.lineCount) - 1;
    void vscode.window.showTextDocument(this.document, { viewColumn: vscode.ViewColumn.One, selection: new vscode.Range(line, 0, line, 0) });
  }

  private dispose(): void {
    this.refresh.cancel();
    for (const disposable of this.disposables) disposable.dispose();
    DagPanel.current = undefined;
  }
}

export function activate(context: vscode.ExtensionContext): void {
  context.subscriptions.push(
    vscode.commands.registerCommand("metaflowStack.showDag", () => {
      const editor = vscode.window.activeTextEditor;
      if (!editor || editor.document.languageId !== "python") {
        void vscode.window.showInformationMessage("Open a Metaflow flow (a Python file) to see its DAG.");
        return;
      }
      DagPanel.show(context, editor.document);
    }),
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (event.affectsConfiguration("metaflowStack.python")) {
        helper?.dispose();
        helper = undefined;
      }
    }),
    { dispose: () => helper?.dispose() },
  );
}

export function deactivate(): void {
  helper?.dispose();
}
