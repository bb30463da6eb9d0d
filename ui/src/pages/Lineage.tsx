// An artifact's lineage: the steps of its run that produced and carried its value (on the DAG), and
// the other runs, of this flow or others, that stored the same value (by content hash).
import { Link, useNavigate, useParams } from "react-router-dom";

import { apiPath, type Lineage as LineageData, type RunPage } from "../api";
import { Dag } from "../components/Dag";
import { ErrorBox } from "../components/Status";
import { bytes } from "../format";
import { byRun } from "../lineage";
import { useLive } from "../live";

function short(sha: string): string {
  return sha.slice(0, 10);
}

export function Lineage() {
  const { flow = "", run = "", step = "", task = "", name = "" } = useParams();
  const navigate = useNavigate();
  const pathspec = `${flow}/${run}/${step}/${task}`;
  const lineage = useLive<LineageData>(`${apiPath("lineage", pathspec)}/${encodeURIComponent(name)}`, `${flow}/${run}`);
  const page = useLive<RunPage>(apiPath("runs", `${flow}/${run}`), `${flow}/${run}`);
  if (lineage.error) return <main><ErrorBox title={`Lineage of ${name} in ${pathspec}`} error={lineage.error.body} /></main>;
  if (!lineage.data) return <main className="muted">Tracing {name}…</main>;
  const { artifact, steps, produced_in, carried_into, elsewhere } = lineage.data;
  const roles = Object.fromEntries(steps.map((s) => [s.step, s.role]));
  const sha = artifact.sha ?? "";

  return (
    <main>
      <h1>
        <Link to={`/${pathspec}`}>{pathspec}</Link> / <code>{name}</code>
      </h1>
      <p data-lineage-summary>
        <code>{artifact.python_type ?? "?"}</code>, {bytes(artifact.size)}, value <code title={sha}>{short(sha)}</code>:
        produced in <strong data-produced-in={produced_in.join(",")}>{produced_in.join(", ") || "an earlier attempt"}</strong>
        {carried_into.length > 0 && (
          <>
            , carried into <span data-carried-into={carried_into.join(",")}>{carried_into.join(", ")}</span>
          </>
        )}
        .
      </p>
      <p className="muted">
        Metaflow records what each step stored, not what it read: a step holding a value its parent steps did not hold
        produced it; a step holding only its parents' values received it unchanged.
      </p>
      {page.data?.graph && (
        <Dag graph={page.data.graph} tasks={page.data.tasks} roles={roles} onSelect={(picked) => navigate(`/${picked.pathspec}`)} />
      )}
      <h2>Steps</h2>
      <table className="kv" data-lineage-steps>
        <thead>
          <tr>
            <th>Step</th>
            <th>Role</th>
            <th>Values held</th>
          </tr>
        </thead>
        <tbody>
          {steps.map((s) => (
            <tr key={s.step} data-lineage-step={s.step} data-role={s.role}>
              <td>{s.step}</td>
              <td>
                <span className={`badge role-${s.role}`}>{s.role}</span>
              </td>
              <td>
                {s.values.map((v) => (
                  <span key={v.sha} className={v.sha === sha ? "value this" : "value"}>
                    <code title={v.sha}>{short(v.sha)}</code> ×{v.tasks}
                    {v.new ? " (new)" : ""}{" "}
                  </span>
                ))}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <h2>The same value elsewhere</h2>
      {elsewhere === null ? (
        <p className="muted">This artifact has no recorded content hash.</p>
      ) : elsewhere.records.length === 0 ? (
        <p className="muted" data-elsewhere={0}>
          No other run stored this value ({elsewhere.flows_searched} flow{elsewhere.flows_searched === 1 ? "" : "s"} searched).
        </p>
      ) : (
        <table className="kv" data-elsewhere={elsewhere.records.length}>
          <thead>
            <tr>
              <th>Run</th>
              <th>Steps holding it (as)</th>
            </tr>
          </thead>
          <tbody>
            {byRun(elsewhere.records).map(([run, steps]) => (
              <tr key={run} data-elsewhere-run={run}>
                <td>
                  <Link to={`/${run}`}>{run}</Link>
                </td>
                <td>
                  {steps.map(({ step, names, first, count }) => (
                    <span key={step} className="value" data-elsewhere-step={step}>
                      <Link to={`/lineage/${first}/${encodeURIComponent(names[0])}`}>{step}</Link> ({names.join(", ")})
                      {count > 1 ? ` ×${count}` : ""}{" "}
                    </span>
                  ))}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {elsewhere?.truncated && <p className="muted">More runs hold it than are listed here.</p>}
    </main>
  );
}
