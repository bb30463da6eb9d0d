// The UI backend's JSON API (metaflow_stack.ui.app), typed.

export type Status = "running" | "completed" | "failed" | "killed";

export interface RunInfo {
  pathspec: string;
  status: Status;
  user: string | null;
  tags: string[];
  system_tags: string[];
  started_at: number;
  finished_at: number | null;
}

export interface StepCounts {
  step_name: string;
  total: number;
  running: number;
  completed: number;
  failed: number;
  killed: number;
}

export interface Failure {
  pathspec: string;
  step_name: string;
  attempt: number | null;
  type: string | null;
  message: string | null;
  traceback: string[];
}

export interface RunSummary {
  pathspec: string;
  status: Status;
  started_at: number;
  finished_at: number | null;
  duration_ms: number;
  steps: StepCounts[];
  first_failure: Failure | null;
}

export interface TaskInfo {
  pathspec: string;
  step_name: string;
  attempt: number;
  status: Status;
  started_at: number;
  finished_at: number | null;
  foreach: string[];
}

export interface GraphStep {
  type: string;
  next: string[];
  foreach_artifact: string | null;
  matching_join: string | null;
  doc: string | null;
  decorators: string[];
}

export interface Graph {
  start_step: string;
  end_step: string;
  file: string | null;
  doc: string | null;
  parameters: Record<string, string>;
  steps: Record<string, GraphStep>;
}

export interface ApiError {
  code: string;
  message: string;
  details?: { fix?: string } | null;
}

export interface RunPage {
  summary: RunSummary;
  graph: Graph | null;
  graph_error: { error: ApiError } | null;
  tasks: TaskInfo[];
}

export interface Artifact {
  pathspec: string;
  name: string;
  attempt: number;
  size: number | null;
  python_type: string | null;
  sha: string | null;
  preview: string | null;
}

export interface Attempt {
  attempt: number;
  started_at: number | null;
  finished_at: number | null;
  ok: boolean | null;
}

export interface Card {
  file: string;
  type: string;
  id: string | null;
  hash: string;
}

/** How a @confidential task's evidence was judged, as its launcher recorded it before the step's code ran. */
export interface Confidential {
  attested: boolean;
  mode: string;
  tee: string | null;
  status: string | null;
  advisory_ids: string[];
  policy: string | null;
  policy_digest: string | null;
  measurements: Record<string, string | number>;
  mr_enclave: string | null;
  /** The step's own image the enclave ran in (`container=True`). */
  image: string | null;
  verified_at: number | null;
  why: string | null;
  /** More than one record for the latest attempt: the step wrote the others, so none is shown. */
  conflicting: boolean;
}

export interface TaskPage {
  pathspec: string;
  attempts: Attempt[];
  metadata: { field: string; value: unknown; type: string; attempt: number }[];
  confidential: Confidential | null;
  artifacts: Artifact[];
  cards: Card[];
  cards_error: { error: ApiError } | null;
}

export interface LogLine {
  ts: string | null;
  source: string;
  text: string;
}

export interface LogWindow {
  pathspec: string;
  stream: string;
  attempt: number;
  lines: LogLine[];
  size: number;
  truncated: boolean;
  next_cursor: string | null;
}

export class RequestError extends Error {
  constructor(
    readonly status: number,
    readonly body: ApiError,
  ) {
    super(body.message);
  }
}

export async function getJson<T>(path: string): Promise<T> {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  let body: unknown;
  try {
    body = await response.json();
  } catch {
    throw new RequestError(response.status, { code: "bad_response", message: `${path}: not JSON` });
  }
  if (!response.ok) throw new RequestError(response.status, body as ApiError);
  return body as T;
}

/** `/api/...` path segments of a pathspec, each encoded. */
export function apiPath(prefix: string, pathspec: string): string {
  return `/api/${prefix}/${pathspec.split("/").map(encodeURIComponent).join("/")}`;
}

export interface ComparedResult {
  name: string;
  a: Artifact | null;
  b: Artifact | null;
  same: boolean;
}

export interface Comparison {
  a: RunSummary;
  b: RunSummary;
  parameters: { name: string; a: string | null; b: string | null; changed: boolean }[];
  results: ComparedResult[];
  metrics: { name: string; a: number; b: number; delta: number; relative: number | null }[];
  steps: { step: string; a_ms: number | null; b_ms: number | null }[];
}

export type LineageRole = "produced" | "carried" | "absent";

export interface Lineage {
  artifact: Omit<Artifact, "preview">;
  steps: { step: string; role: LineageRole; values: { sha: string; tasks: number; new: boolean }[] }[];
  produced_in: string[];
  carried_into: string[];
  elsewhere: { records: Omit<Artifact, "preview">[]; truncated: boolean; flows_searched: number } | null;
}
