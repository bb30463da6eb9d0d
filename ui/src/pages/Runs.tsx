// The runs list: filters in the URL (shareable), newest first, pages by cursor, live.
import { useEffect, useState } from "react";
import { Link, useNavigate, useSearchParams } from "react-router-dom";

import { getJson, type RunInfo } from "../api";
import { ErrorBox, StatusBadge } from "../components/Status";
import { duration, when } from "../format";
import { useLive } from "../live";

const FILTERS = ["flow", "status", "user", "tag", "since", "until"] as const;

export function Runs() {
  const [params, setParams] = useSearchParams();
  const [flows, setFlows] = useState<string[]>([]);
  const [cursors, setCursors] = useState<(string | null)[]>([null]);
  const [picked, setPicked] = useState<string[]>([]);
  const navigate = useNavigate();
  const query = new URLSearchParams();
  for (const name of FILTERS) {
    const value = params.get(name);
    if (value) query.set(name, value);
  }
  const page = cursors[cursors.length - 1];
  if (page) query.set("cursor", page);
  const runs = useLive<{ runs: RunInfo[]; next_cursor: string | null }>(`/api/runs?${query}`, "*", 1000);

  useEffect(() => {
    getJson<string[]>("/api/flows").then(setFlows, () => setFlows([]));
  }, [runs.data]);

  const set = (name: string, value: string) => {
    const next = new URLSearchParams(params);
    if (value) next.set(name, value);
    else next.delete(name);
    setParams(next);
    setCursors([null]);
  };

  return (
    <main>
      <h1>Runs</h1>
      <form className="filters" onSubmit={(event) => event.preventDefault()}>
        <label>
          Flow
          <select name="flow" value={params.get("flow") ?? ""} onChange={(e) => set("flow", e.target.value)}>
            <option value="">all flows</option>
            {flows.map((flow) => (
              <option key={flow}>{flow}</option>
            ))}
          </select>
        </label>
        <label>
          Status
          <select name="status" value={params.get("status") ?? ""} onChange={(e) => set("status", e.target.value)}>
            <option value="">any</option>
            {["running", "completed", "failed", "killed"].map((status) => (
              <option key={status}>{status}</option>
            ))}
          </select>
        </label>
        {(["user", "tag"] as const).map((name) => (
          <label key={name}>
            {name === "user" ? "User" : "Tag"}
            <input name={name} defaultValue={params.get(name) ?? ""} onBlur={(e) => set(name, e.target.value.trim())} />
          </label>
        ))}
        <label>
          Started
          <select name="since" value={params.get("since") ?? ""} onChange={(e) => set("since", e.target.value)}>
            <option value="">any time</option>
            <option value="1h">last hour</option>
            <option value="24h">last day</option>
            <option value="7d">last week</option>
            <option value="30d">last 30 days</option>
          </select>
        </label>
      </form>
      {runs.error && <ErrorBox title="Runs could not be listed" error={runs.error.body} />}
      {runs.data && (
        <>
          <table className="runs">
            <thead>
              <tr>
                <th>
                  <button
                    disabled={picked.length !== 2}
                    data-compare
                    onClick={() => navigate(`/compare?${new URLSearchParams({ a: picked[0], b: picked[1] })}`)}
                  >
                    Compare
                  </button>
                </th>
                <th>Run</th>
                <th>Status</th>
                <th>User</th>
                <th>Started</th>
                <th>Duration</th>
                <th>Tags</th>
              </tr>
            </thead>
            <tbody>
              {runs.data.runs.map((run) => (
                <tr key={run.pathspec} data-run={run.pathspec}>
                  <td>
                    <input
                      type="checkbox"
                      aria-label={`pick ${run.pathspec} to compare`}
                      checked={picked.includes(run.pathspec)}
                      onChange={(e) =>
                        setPicked(e.target.checked ? [...picked, run.pathspec].slice(-2) : picked.filter((p) => p !== run.pathspec))
                      }
                    />
                  </td>
                  <td>
                    <Link to={`/${run.pathspec}`}>{run.pathspec}</Link>
                  </td>
                  <td>
                    <StatusBadge status={run.status} />
                  </td>
                  <td>{run.user ?? "–"}</td>
                  <td>{when(run.started_at)}</td>
                  <td>{run.finished_at ? duration(run.finished_at - run.started_at) : "–"}</td>
                  <td>{run.tags.join(", ")}</td>
                </tr>
              ))}
            </tbody>
          </table>
          {runs.data.runs.length === 0 && <p className="muted">No run matches these filters.</p>}
          <div className="pager">
            {cursors.length > 1 && <button onClick={() => setCursors(cursors.slice(0, -1))}>Newer</button>}
            {runs.data.next_cursor && <button onClick={() => setCursors([...cursors, runs.data!.next_cursor])}>Older</button>}
          </div>
        </>
      )}
    </main>
  );
}
