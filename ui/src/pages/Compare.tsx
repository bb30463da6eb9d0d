// Two runs side by side: parameter changes, result differences, metric and timing deltas.
import { Link, useSearchParams } from "react-router-dom";

import { type Comparison } from "../api";
import { ErrorBox, StatusBadge } from "../components/Status";
import { bytes, duration } from "../format";
import { useLive } from "../live";

function signed(value: number, digits = 4): string {
  const text = Number.isInteger(value) ? String(value) : value.toFixed(digits);
  return value > 0 ? `+${text}` : text;
}

function msDelta(a: number | null, b: number | null): string {
  if (a === null || b === null) return "–";
  return `${b >= a ? "+" : "−"}${duration(Math.abs(b - a))}`;
}

export function Compare() {
  const [params] = useSearchParams();
  const a = params.get("a") ?? "";
  const b = params.get("b") ?? "";
  const query = new URLSearchParams({ a, b });
  const compared = useLive<Comparison>(a && b ? `/api/compare?${query}` : null, "*", 1000);
  if (!a || !b) return <main><ErrorBox title="Pick two runs" error={{ message: "Select two runs in the runs list, then Compare." }} /></main>;
  if (compared.error) return <main><ErrorBox title="The runs could not be compared" error={compared.error.body} /></main>;
  if (!compared.data) return <main className="muted">Comparing {a} and {b}…</main>;
  const { parameters, results, metrics, steps } = compared.data;

  return (
    <main className="compare">
      <h1>Compare runs</h1>
      <table className="kv">
        <thead>
          <tr>
            <th></th>
            <th>
              A: <Link to={`/${a}`}>{a}</Link> <StatusBadge status={compared.data.a.status} />
            </th>
            <th>
              B: <Link to={`/${b}`}>{b}</Link> <StatusBadge status={compared.data.b.status} />
            </th>
            <th>B − A</th>
          </tr>
        </thead>
        <tbody>
          <tr>
            <th>duration</th>
            <td>{duration(compared.data.a.duration_ms)}</td>
            <td>{duration(compared.data.b.duration_ms)}</td>
            <td>{msDelta(compared.data.a.duration_ms, compared.data.b.duration_ms)}</td>
          </tr>
        </tbody>
      </table>

      <h2>Parameters</h2>
      <table className="kv">
        <tbody>
          {parameters.map((p) => (
            <tr key={p.name} data-compare-parameter={p.name} data-changed={p.changed} className={p.changed ? "changed" : undefined}>
              <th>{p.name}</th>
              <td><code>{p.a ?? "–"}</code></td>
              <td><code>{p.b ?? "–"}</code></td>
              <td>{p.changed ? "changed" : "same"}</td>
            </tr>
          ))}
        </tbody>
      </table>

      <h2>Metrics</h2>
      {metrics.length === 0 ? (
        <p className="muted">No numeric result in both runs.</p>
      ) : (
        <table className="kv">
          <tbody>
            {metrics.map((m) => (
              <tr key={m.name} data-metric={m.name}>
                <th>{m.name}</th>
                <td>{m.a}</td>
                <td>{m.b}</td>
                <td className={m.delta === 0 ? "muted" : m.delta > 0 ? "up" : "down"}>
                  {signed(m.delta)}
                  {m.relative !== null && ` (${signed(m.relative * 100, 1)}%)`}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      )}

      <h2>Results (the end step's artifacts)</h2>
      <table className="kv">
        <tbody>
          {results.map((r) => (
            <tr key={r.name} data-result={r.name} data-same={r.same} className={r.same ? undefined : "changed"}>
              <th>{r.name}</th>
              <td>{r.a ? <code>{r.a.preview ?? `${r.a.python_type}, ${bytes(r.a.size)}`}</code> : "absent"}</td>
              <td>{r.b ? <code>{r.b.preview ?? `${r.b.python_type}, ${bytes(r.b.size)}`}</code> : "absent"}</td>
              <td>{r.same ? "same value" : r.a && r.b ? "differs" : "only in one"}</td>
            </tr>
          ))}
        </tbody>
      </table>

      <h2>Step timing</h2>
      <table className="kv">
        <tbody>
          {steps.map((s) => (
            <tr key={s.step}>
              <th>{s.step}</th>
              <td>{s.a_ms === null ? "–" : duration(s.a_ms)}</td>
              <td>{s.b_ms === null ? "–" : duration(s.b_ms)}</td>
              <td>{msDelta(s.a_ms, s.b_ms)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </main>
  );
}
