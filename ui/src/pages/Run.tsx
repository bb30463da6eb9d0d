// A run: summary, live DAG, timeline, parameters, tasks, and the log of the task picked.
import { useEffect, useState } from "react";
import { Link, useParams } from "react-router-dom";

import { apiPath, type RunPage, type TaskInfo } from "../api";
import { Dag } from "../components/Dag";
import { KeyValues } from "../components/KeyValues";
import { Logs } from "../components/Logs";
import { ErrorBox, StatusBadge } from "../components/Status";
import { Timeline } from "../components/Timeline";
import { duration, when } from "../format";
import { useLive } from "../live";

export function Run() {
  const { flow = "", run = "" } = useParams();
  const pathspec = `${flow}/${run}`;
  const page = useLive<RunPage>(apiPath("runs", pathspec), pathspec);
  const [picked, setPicked] = useState<TaskInfo | null>(null);
  const [now, setNow] = useState(Date.now());
  const running = page.data?.summary.status === "running";

  useEffect(() => {
    if (!running) return;
    const timer = window.setInterval(() => setNow(Date.now()), 1000);
    return () => window.clearInterval(timer);
  }, [running]);

  if (page.error) return <main><ErrorBox title={`Run ${pathspec}`} error={page.error.body} /></main>;
  if (!page.data) return <main className="muted">Loading {pathspec}…</main>;
  const { summary, graph, graph_error, tasks } = page.data;
  const current = picked ? (tasks.find((t) => t.pathspec === picked.pathspec) ?? picked) : null;

  return (
    <main>
      <h1>
        <Link to={`/?flow=${encodeURIComponent(flow)}`}>{flow}</Link> / {run} <StatusBadge status={summary.status} />
      </h1>
      <p className="muted">
        started {when(summary.started_at)} · {duration((summary.finished_at ?? now) - summary.started_at)}
        {graph?.file && ` · ${graph.file}`}
      </p>
      {summary.first_failure && (
        <div className="error-box" data-first-failure>
          <strong>
            <Link to={`/${summary.first_failure.pathspec}`}>{summary.first_failure.pathspec}</Link> failed:
          </strong>{" "}
          {summary.first_failure.type}: {summary.first_failure.message}
        </div>
      )}
      <div className="run-grid">
        <section>
          <h2>Graph</h2>
          {graph ? (
            <Dag graph={graph} tasks={tasks} onSelect={setPicked} />
          ) : (
            <ErrorBox title="The graph could not be shown" error={graph_error?.error ?? { message: "not recorded" }} />
          )}
        </section>
        <section>
          <h2>Parameters</h2>
          {graph && Object.keys(graph.parameters).length > 0 ? (
            <KeyValues rows={Object.entries(graph.parameters)} mark="parameter" />
          ) : (
            <p className="muted">None.</p>
          )}
          <h2>Steps</h2>
          <table className="kv">
            <tbody>
              {summary.steps.map((step) => (
                <tr key={step.step_name}>
                  <th>{step.step_name}</th>
                  <td>
                    {step.completed}/{step.total} done{step.failed > 0 && `, ${step.failed} failed`}
                    {step.running > 0 && `, ${step.running} running`}
                    {step.killed > 0 && `, ${step.killed} killed`}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </section>
      </div>
      <h2>Timeline</h2>
      <Timeline tasks={tasks} now={now} onSelect={setPicked} />
      {current && (
        <section>
          <h2>
            <Link to={`/${current.pathspec}`}>{current.pathspec}</Link> <StatusBadge status={current.status} />
          </h2>
          <Logs pathspec={current.pathspec} running={current.status === "running"} version={page.version} />
        </section>
      )}
    </main>
  );
}
