// The run launcher's model, apart from VS Code: the form's fields (the runtime types each Parameter, as it
// converts its value), the backends the runtime offers (usable or with their fix), the launcher process's
// command line, and its JSON lines.

export interface Backend {
  name: string;
  decorator: string | null;
  detail: string;
  usable: boolean;
  fix: string | null;
}

/** A field of the form, as the runtime's ``form`` answers it. */
export interface Field {
  name: string;
  /** The type the value is converted to (the Parameter's, else its default's, as Metaflow infers it). */
  type: string;
  /** The default as written in the source; empty when there is none. */
  placeholder: string;
  help: string;
  required: boolean;
}

/** What the extension posts to the launcher page, and what it posts back. */
export type ToLauncher =
  | { type: "form"; flow: string; file: string; fields: Field[]; backends: Backend[] }
  | { type: "launched"; run: string }
  | { type: "finished"; status: string; returncode: number }
  | { type: "error"; message: string };
/** ``ready``: the page listens (a message posted before its script ran would be lost on a busy machine). */
export type FromLauncher = { type: "ready" } | { type: "launch"; values: Record<string, string>; backend: string };

/** One line the launcher process printed. */
export type LaunchEvent =
  | { event: "started"; run: string }
  | { event: "output"; stream: "stdout" | "stderr"; line: string }
  | { event: "finished"; status: string; returncode: number }
  | { error: { code: string; message: string; fix: string | null } };

/** The launcher process's arguments: ``python -m metaflow_stack.ide launch FILE --param N=V ... --backend B``;
 *  empty values are left out (the flow's default applies). */
export function launchArgs(file: string, values: Record<string, string>, backend: string): string[] {
  const params = Object.entries(values)
    .filter(([, value]) => value !== "")
    .flatMap(([name, value]) => ["--param", `${name}=${value}`]);
  return ["-m", "metaflow_stack.ide", "launch", file, ...params, "--backend", backend];
}

/** A line the launcher printed, or null for one that is not its JSON (never expected; ignored). */
export function launchEvent(line: string): LaunchEvent | null {
  try {
    const parsed: unknown = JSON.parse(line);
    return typeof parsed === "object" && parsed !== null ? (parsed as LaunchEvent) : null;
  } catch {
    return null;
  }
}
