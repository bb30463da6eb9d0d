// The run launcher: a form from the flow's Parameters and the backends the runtime finds usable, and the run
// started through the runtime's launcher (Metaflow's Runner), its output streamed into the "Metaflow Runs"
// output channel, and the DAG beside the flow following the run.
import { type ChildProcess, spawn } from "node:child_process";
import * as path from "node:path";
import { createInterface } from "node:readline";
import * as vscode from "vscode";

import { Refused } from "./helper";
import { type Backend, type Field, type FromLauncher, launchArgs, launchEvent, type ToLauncher } from "./launcherModel";
import { openPage } from "./panels";
import { metaflowEnv, python, theHelper, workspaceFolder } from "./runtime";

export class Launcher {
  private static current: Launcher | undefined;
  private process: ChildProcess | undefined;
  /** Whether the running launch reported its end (finished, or refused with an error line). */
  private ended = false;

  /** The form for ``document``'s flow; ``started`` is told each run's id as soon as it has one. */
  static show(context: vscode.ExtensionContext, document: vscode.TextDocument, output: vscode.OutputChannel, started: (run: string) => void): void {
    Launcher.current?.panel.dispose();
    const panel = openPage(context, "launcher", "Run Flow", vscode.ViewColumn.Beside);
    Launcher.current = new Launcher(panel, document, output, started); // the form is posted once the page is ready
  }

  private constructor(
    readonly panel: vscode.WebviewPanel,
    private readonly document: vscode.TextDocument,
    private readonly output: vscode.OutputChannel,
    private readonly started: (run: string) => void,
  ) {
    panel.webview.onDidReceiveMessage((message: FromLauncher) => (message.type === "ready" ? this.fill() : this.launch(message)));
    panel.onDidDispose(() => {
      this.process?.kill(); // the form's run goes with the form
      if (Launcher.current === this) Launcher.current = undefined;
    });
  }

  private async post(message: ToLauncher): Promise<void> {
    await this.panel.webview.postMessage(message);
  }

  private async fill(): Promise<void> {
    try {
      const [form, backends] = await Promise.all([
        theHelper().request<{ flow: string; fields: Field[] }>("form", { path: this.document.uri.fsPath, source: this.document.getText() }),
        theHelper().request<Backend[]>("backends", {}),
      ]);
      await this.post({ type: "form", flow: form.flow, file: path.basename(this.document.uri.fsPath), fields: form.fields, backends });
    } catch (error) {
      await this.post({ type: "error", message: error instanceof Refused ? error.message : (error as Error).message });
    }
  }

  private async launch(message: FromLauncher): Promise<void> {
    if (message.type !== "launch" || this.process) return;
    if (this.document.isDirty) await this.document.save(); // the run runs the file, as saved
    const args = launchArgs(this.document.uri.fsPath, message.values, message.backend);
    this.output.show(true);
    const shown = args.map((arg) => (arg === this.document.uri.fsPath ? vscode.workspace.asRelativePath(arg) : arg));
    this.output.appendLine(`$ ${path.basename(python())} ${shown.join(" ")}`);
    const child = spawn(python(), args, { cwd: workspaceFolder(), env: { ...process.env, ...metaflowEnv() }, stdio: ["ignore", "pipe", "pipe"] });
    this.process = child;
    let stderr = "";
    this.ended = false;
    child.stderr?.on("data", (chunk: Buffer) => {
      stderr = (stderr + chunk.toString()).slice(-4000);
    });
    const lines = createInterface({ input: child.stdout! });
    lines.on("line", (line) => void this.reported(line));
    child.on("error", (error) => {
      this.process = undefined;
      void this.post({ type: "error", message: `cannot start ${python()}: ${error.message} (fix: set metaflowStack.python)` });
    });
    child.on("close", (code) => {
      this.process = undefined;
      if (code !== 0 && stderr.trim()) this.output.appendLine(stderr.trim());
      if (!this.ended) void this.post({ type: "error", message: `the launcher stopped (exit ${code}): ${stderr.trim().split("\n").pop() ?? ""}` });
    });
  }

  private async reported(line: string): Promise<void> {
    const event = launchEvent(line);
    if (event === null) return;
    if ("error" in event) {
      this.ended = true;
      const { message, fix } = event.error;
      this.output.appendLine(`error: ${message}${fix ? ` (fix: ${fix})` : ""}`);
      await this.post({ type: "error", message: fix ? `${message} (fix: ${fix})` : message });
    } else if (event.event === "started") {
      this.output.appendLine(`started ${event.run}`);
      this.started(event.run);
      await this.post({ type: "launched", run: event.run });
    } else if (event.event === "output") {
      this.output.appendLine(event.line);
    } else {
      this.ended = true;
      this.output.appendLine(`finished: ${event.status} (exit ${event.returncode})`);
      await this.post({ type: "finished", status: event.status, returncode: event.returncode });
    }
  }
}
