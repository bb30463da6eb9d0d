// The DAG beside the flow being edited, redrawn as the user types; with a run chosen (launched from the
// form, or "Show on DAG" in the sidebar), its tasks' statuses overlaid, polled until the run ends.
import * as path from "node:path";
import * as vscode from "vscode";

import type { TaskInfo } from "../../ui/src/api";
import { debounced, type FlowGraph, type FromWebview, looksLikeFlow, type ToWebview } from "./flowGraph";
import { Refused } from "./helper";
import { openPage } from "./panels";
import type { RunSummary, TaskList } from "./runsModel";
import { theHelper } from "./runtime";

/** Milliseconds after the last keystroke before the graph is asked for again. */
const TYPING_PAUSE = 120;
/** Milliseconds between looks at a running run's tasks. */
const RUN_POLL = 1000;
/** Looks at a run not recorded (yet) before the overlay gives up. */
const MAX_MISSES = 30;
/** Tasks overlaid at most (pages of the helper's 1,000). */
const MAX_OVERLAID = 10_000;

/** Every task of ``run``, page after page (bounded). */
async function runTasks(run: string): Promise<TaskInfo[]> {
  const tasks: TaskInfo[] = [];
  let cursor: string | null = null;
  do {
    const page: TaskList = await theHelper().request<TaskList>("tasks", { run, limit: 1000, cursor });
    tasks.push(...page.tasks);
    cursor = page.next_cursor;
  } while (cursor && tasks.length < MAX_OVERLAID);
  return tasks;
}

/** One panel beside the editor, following the flow document it was opened for. */
export class DagPanel {
  private static current: DagPanel | undefined;
  private readonly disposables: vscode.Disposable[] = [];
  private readonly refresh = debounced(() => void this.draw(), TYPING_PAUSE);
  private run: string | null = null;
  /** Bumped by each showRun and by dispose: an answer for an older one is dropped, its polling ends. */
  private generation = 0;
  private poll: ReturnType<typeof setTimeout> | undefined;
  /** The run's last summary (its tasks are listed again only when it changed: one request a look). */
  private seen = "";

  static show(context: vscode.ExtensionContext, document: vscode.TextDocument): DagPanel {
    if (DagPanel.current) {
      DagPanel.current.follow(document);
      DagPanel.current.panel.reveal(vscode.ViewColumn.Beside, true);
      return DagPanel.current;
    }
    DagPanel.current = new DagPanel(openPage(context, "dag", "Metaflow DAG", vscode.ViewColumn.Beside), document);
    return DagPanel.current;
  }

  private constructor(
    readonly panel: vscode.WebviewPanel,
    private document: vscode.TextDocument,
  ) {
    this.disposables.push(
      vscode.workspace.onDidChangeTextDocument((event) => {
        if (event.document === this.document) this.refresh();
      }),
      vscode.window.onDidChangeActiveTextEditor((editor) => {
        if (editor && editor.document.languageId === "python" && looksLikeFlow(editor.document.getText())) this.follow(editor.document);
      }),
      panel.webview.onDidReceiveMessage((message: FromWebview) => (message.type === "ready" ? this.redraw() : this.reveal(message))),
      panel.onDidDispose(() => this.dispose()),
    );
  }

  /** Everything the page shows, posted again: it has just (re)loaded and listens. */
  private redraw(): void {
    void this.draw();
    if (this.run !== null) this.showRun(this.run);
  }

  /** Overlay ``run``'s statuses (``Flow/123``), following it while it runs; null clears the overlay. */
  showRun(run: string | null): void {
    this.run = run;
    this.seen = "";
    this.generation += 1;
    if (this.poll) clearTimeout(this.poll);
    void this.overlay(this.generation, 0);
  }

  private async overlay(generation: number, misses: number): Promise<void> {
    const run = this.run;
    if (run === null) {
      await this.post({ type: "run", run: null, status: null, tasks: [] });
      return;
    }
    const again = (next: number) => {
      if (generation === this.generation) this.poll = setTimeout(() => void this.overlay(generation, next), RUN_POLL);
    };
    try {
      const summary = await theHelper().request<RunSummary>("summary", { run });
      const seen = JSON.stringify([summary.status, summary.steps]);
      if (seen !== this.seen) {
        const tasks = await runTasks(run);
        if (generation !== this.generation) return;
        this.seen = seen;
        await this.post({ type: "run", run, status: summary.status, tasks });
      }
      if (summary.status === "running") again(0);
    } catch {
      // A run the launcher just started may not be recorded yet: look again, for a while.
      if (generation !== this.generation) return;
      await this.post({ type: "run", run, status: null, tasks: [] });
      if (misses < MAX_MISSES) again(misses + 1);
    }
  }

  private follow(document: vscode.TextDocument): void {
    if (document === this.document) return;
    this.document = document;
    void this.draw();
  }

  private async post(message: ToWebview): Promise<void> {
    await this.panel.webview.postMessage(message);
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
    await this.post(message);
  }

  private reveal(message: FromWebview): void {
    if (message.type !== "reveal" || !Number.isInteger(message.line) || message.line < 1) return;
    const line = Math.min(message.line, this.document.lineCount) - 1;
    void vscode.window.showTextDocument(this.document, { viewColumn: vscode.ViewColumn.One, selection: new vscode.Range(line, 0, line, 0) });
  }

  private dispose(): void {
    this.refresh.cancel();
    this.generation += 1;
    this.run = null;
    if (this.poll) clearTimeout(this.poll);
    for (const disposable of this.disposables) disposable.dispose();
    DagPanel.current = undefined;
  }
}
