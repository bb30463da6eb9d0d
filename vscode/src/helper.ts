// The runtime's helper process (`python -m metaflow_stack.ide serve`): started once, asked in JSON lines, each
// answer matched to its request by id. Importing Metaflow takes most of a second; a graph then takes
// milliseconds, so the editor keeps one process and restarts it only when it stops.
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";
import { createInterface } from "node:readline";

export interface HelperError {
  code: string;
  message: string;
  fix: string | null;
}

/** A request the runtime refused (a half-written buffer, say): its one line, with its fix. */
export class Refused extends Error {
  constructor(readonly error: HelperError) {
    super(error.fix ? `${error.message} (fix: ${error.fix})` : error.message);
  }
}

interface Waiting {
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
}

export class Helper {
  private process: ChildProcessWithoutNullStreams | undefined;
  private nextId = 1;
  private readonly waiting = new Map<number, Waiting>();
  private stderr = "";

  /** `python`: the interpreter with metaflow-stack installed; `cwd`: where flows' relative paths resolve;
   *  `env`: Metaflow's settings over the editor's environment. */
  constructor(
    private readonly python: string,
    private readonly cwd?: string,
    private readonly env: Record<string, string> = {},
  ) {}

  request<T>(method: string, params: unknown): Promise<T> {
    const child = this.started();
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (value: unknown) => void, reject });
      child.stdin.write(`${JSON.stringify({ id, method, params })}\n`);
    });
  }

  dispose(): void {
    this.process?.kill();
    this.process = undefined;
  }

  private started(): ChildProcessWithoutNullStreams {
    if (this.process && this.process.exitCode === null && !this.process.killed) return this.process;
    const child = spawn(this.python, ["-m", "metaflow_stack.ide", "serve"], { cwd: this.cwd, stdio: "pipe", env: { ...process.env, ...this.env } });
    this.process = child;
    this.stderr = "";
    child.stderr.on("data", (chunk: Buffer) => {
      this.stderr = (this.stderr + chunk.toString()).slice(-4000);
    });
    createInterface({ input: child.stdout }).on("line", (line) => this.answered(line));
    const stopped = (why: string) => {
      if (this.process === child) this.process = undefined;
      for (const waiting of this.waiting.values()) waiting.reject(new Error(why));
      this.waiting.clear();
    };
    child.on("error", (error) => stopped(`cannot start ${this.python}: ${error.message} (fix: set metaflowStack.python)`));
    child.on("exit", () => stopped(helperStopped(this.python, this.stderr)));
    return child;
  }

  private answered(line: string): void {
    let answer: { id?: unknown; result?: unknown; error?: HelperError };
    try {
      answer = JSON.parse(line);
    } catch {
      return; // not an answer (the helper writes nothing else; a stray line is ignored)
    }
    const waiting = typeof answer.id === "number" ? this.waiting.get(answer.id) : undefined;
    if (!waiting || typeof answer.id !== "number") return;
    this.waiting.delete(answer.id);
    if (answer.error) waiting.reject(new Refused(answer.error));
    else waiting.resolve(answer.result);
  }
}

/** Why the helper stopped, in one line naming the fix (its last stderr line says what Python said). */
export function helperStopped(python: string, stderr: string): string {
  const last = stderr.trim().split("\n").pop() ?? "";
  if (last.includes("No module named")) return `${python} has no metaflow-stack (fix: pip install metaflow-stack there, or set metaflowStack.python)`;
  return `the Metaflow Stack helper stopped${last ? `: ${last}` : ""}`;
}
