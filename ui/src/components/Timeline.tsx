// A Gantt chart of the run's tasks: one row per task, grouped by step in start order.
import type { TaskInfo } from "../api";
import { duration } from "../format";

const ROW = 14;
const LABEL = 150;
const WIDTH = 900;
const MAX_ROWS = 2000;

export function Timeline({ tasks, now, onSelect }: { tasks: TaskInfo[]; now: number; onSelect: (task: TaskInfo) => void }) {
  if (tasks.length === 0) return <p className="muted">No task has started yet.</p>;
  const rows = [...tasks].sort((a, b) => a.started_at - b.started_at).slice(0, MAX_ROWS);
  const start = rows[0].started_at;
  const end = Math.max(...rows.map((t) => t.finished_at ?? now), start + 1);
  const scale = (WIDTH - LABEL - 10) / (end - start);
  return (
    <div className="timeline-scroll">
      <svg className="timeline" width={WIDTH} height={rows.length * ROW + 20} role="img" aria-label="timeline">
        {rows.map((task, i) => {
          const x = LABEL + (task.started_at - start) * scale;
          const width = Math.max(2, ((task.finished_at ?? now) - task.started_at) * scale);
          const label = `${task.step_name}${task.foreach.length ? ` [${task.foreach.join(", ")}]` : ""}`;
          return (
            <g key={task.pathspec} data-bar={task.pathspec} onClick={() => onSelect(task)}>
              <text className="bar-label" x={4} y={i * ROW + 11}>
                {label.length > 24 ? `${label.slice(0, 23)}…` : label}
              </text>
              <rect className={`bar status-${task.status}`} x={x} y={i * ROW + 2} width={width} height={ROW - 4} rx={2}>
                <title>{`${task.pathspec} · ${task.status} · ${duration((task.finished_at ?? now) - task.started_at)}`}</title>
              </rect>
            </g>
          );
        })}
        <text className="muted" x={LABEL} y={rows.length * ROW + 16}>
          0
        </text>
        <text className="muted" x={WIDTH - 10} y={rows.length * ROW + 16} textAnchor="end">
          {duration(end - start)}
        </text>
      </svg>
      {tasks.length > MAX_ROWS && <p className="muted">First {MAX_ROWS} of {tasks.length} tasks.</p>}
    </div>
  );
}
