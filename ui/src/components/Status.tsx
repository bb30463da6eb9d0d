import type { StepStatus } from "../dag";

export function StatusBadge({ status }: { status: StepStatus }) {
  return (
    <span className={`badge status-${status}`} data-status={status}>
      {status}
    </span>
  );
}

export function ErrorBox({ title, error }: { title: string; error: { message: string; details?: { fix?: string } | null } }) {
  return (
    <div className="error-box" role="alert">
      <strong>{title}</strong>
      <div>{error.message}</div>
      {error.details?.fix && <div className="fix">{error.details.fix}</div>}
    </div>
  );
}
