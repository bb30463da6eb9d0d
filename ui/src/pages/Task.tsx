// A task: attempts, a @confidential task's verification, artifacts with sizes, types and safe previews, metadata,
// and its logs.
import { Link, useParams } from "react-router-dom";

import { apiPath, type Confidential, type TaskPage } from "../api";
import { KeyValues } from "../components/KeyValues";
import { Logs } from "../components/Logs";
import { ErrorBox } from "../components/Status";
import { bytes, duration, when } from "../format";
import { useLive } from "../live";

export function Task() {
  const { flow = "", run = "", step = "", task = "" } = useParams();
  const pathspec = `${flow}/${run}/${step}/${task}`;
  const page = useLive<TaskPage>(apiPath("tasks", pathspec), `${flow}/${run}`);
  if (page.error) return <main><ErrorBox title={`Task ${pathspec}`} error={page.error.body} /></main>;
  if (!page.data) return <main className="muted">Loading {pathspec}…</main>;
  const { attempts, artifacts, metadata, cards, cards_error, confidential } = page.data;
  const user = artifacts.filter((a) => !a.name.startsWith("_"));
  const internal = artifacts.filter((a) => a.name.startsWith("_"));
  const running = attempts.length > 0 && attempts[0].ok === null;

  return (
    <main>
      <h1>
        <Link to={`/${flow}/${run}`}>
          {flow}/{run}
        </Link>{" "}
        / {step} / {task}
      </h1>
      <h2>Attempts</h2>
      <table className="kv" data-attempts={attempts.length}>
        <thead>
          <tr>
            <th>Attempt</th>
            <th>Outcome</th>
            <th>Started</th>
            <th>Duration</th>
          </tr>
        </thead>
        <tbody>
          {attempts.map((attempt) => (
            <tr key={attempt.attempt}>
              <td>{attempt.attempt}</td>
              <td>
                <span className={`badge status-${attempt.ok === null ? "running" : attempt.ok ? "completed" : "failed"}`}>
                  {attempt.ok === null ? "running" : attempt.ok ? "succeeded" : "failed"}
                </span>
              </td>
              <td>{when(attempt.started_at)}</td>
              <td>{attempt.started_at && attempt.finished_at ? duration(attempt.finished_at - attempt.started_at) : "–"}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {confidential && <Verification verification={confidential} />}
      <h2>Artifacts</h2>
      <ArtifactTable artifacts={user} task={pathspec} />
      <details>
        <summary>Metaflow's own artifacts ({internal.length})</summary>
        <ArtifactTable artifacts={internal} task={pathspec} />
      </details>
      {(cards.length > 0 || cards_error) && (
        <>
          <h2>Cards</h2>
          {cards_error && <ErrorBox title="The cards could not be listed" error={cards_error.error} />}
          {cards.map((card) => (
            <figure key={card.file} className="card-frame" data-card={card.id ?? card.type}>
              <figcaption>
                {card.type}
                {card.id ? ` · ${card.id}` : ""}{" "}
                <a href={`${apiPath("cards", pathspec)}/${encodeURIComponent(card.file)}`} target="_blank" rel="noreferrer">
                  open
                </a>
              </figcaption>
              {/* A card is the flow's own page with its own scripts: framed sandboxed, in an opaque origin. */}
              <iframe
                title={`card ${card.id ?? card.type}`}
                sandbox="allow-scripts"
                src={`${apiPath("cards", pathspec)}/${encodeURIComponent(card.file)}`}
              />
            </figure>
          ))}
        </>
      )}
      <h2>Logs</h2>
      <Logs pathspec={pathspec} running={running} version={page.version} />
      <details>
        <summary>Metadata ({metadata.length})</summary>
        <table className="kv">
          <tbody>
            {metadata.map((datum, i) => (
              <tr key={i}>
                <th>{datum.field}</th>
                <td>{typeof datum.value === "string" ? datum.value : JSON.stringify(datum.value)}</td>
                <td className="muted">attempt {datum.attempt}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </details>
    </main>
  );
}

/** What each TEE mode is, as the launcher records it. */
const MODES: Record<string, string> = {
  sgx: "SGX enclave (gramine-sgx)",
  tdx: "TDX confidential VM (Phala Cloud)",
  direct: "direct (gramine-direct: development, no TEE)",
};

/** What the page says of a verification. It shows the record the run's launcher wrote, as the run claims it
 * (unsigned: the page checks no signature), and more than one record for the attempt as a conflict, never attested. */
function verdict(v: Confidential): { state: string; label: string; badge: string; sentence: string } {
  if (v.conflicting)
    return {
      state: "conflicting",
      label: "conflicting records",
      badge: "failed",
      sentence:
        "Its latest attempt has more than one verification record: its launcher writes one before the step's code runs, so the step wrote the others. Records are unsigned, so none is shown and nothing vouches for where this task ran.",
    };
  if (v.attested)
    return {
      state: "attested",
      label: "attested, as recorded",
      badge: "running",
      sentence:
        "The run recorded that its quote passed the policy before the step's code ran; its sealed values open only in attested enclaves. This is the run's own record, unsigned (its step's code could have written it): this page checked no signature.",
    };
  return {
    state: "unattested",
    label: "unattested",
    badge: "running",
    sentence: "No quote: nothing vouches for where this task ran. Its sealed values are for development only.",
  };
}

/** The record's fields, as the run's launcher wrote them. */
function recordedRows(v: Confidential): [string, string][] {
  const rows: [string, string][] = [["Mode", MODES[v.mode] ?? v.mode]];
  if (v.image) rows.push(["Image", v.image]);
  if (v.attested) {
    rows.push(["TEE", (v.tee ?? "?").toUpperCase()], ["TCB status", v.status ?? "?"]);
    if (v.advisory_ids.length > 0) rows.push(["Advisories", v.advisory_ids.join(", ")]);
    rows.push(["Policy", `${v.policy ?? "?"} (sha256 ${(v.policy_digest ?? "").slice(0, 16)}…)`]);
    for (const [name, value] of Object.entries(v.measurements)) rows.push([name, String(value)]);
    if (v.verified_at) rows.push(["Verified", when(v.verified_at * 1000)]);
  } else if (v.why) {
    rows.push(["Why", v.why]);
  }
  return rows;
}

function Verification({ verification }: { verification: Confidential }) {
  const shown = verdict(verification);
  return (
    <section data-confidential={shown.state}>
      <h2>
        Confidential computing <span className={`badge status-${shown.badge}`}>{shown.label}</span>
      </h2>
      <p className="muted">{shown.sentence}</p>
      {!verification.conflicting && <KeyValues rows={recordedRows(verification)} />}
    </section>
  );
}

function ArtifactTable({ artifacts, task }: { artifacts: TaskPage["artifacts"]; task: string }) {
  if (artifacts.length === 0) return <p className="muted">None.</p>;
  return (
    <table className="artifacts">
      <thead>
        <tr>
          <th>Name</th>
          <th>Type</th>
          <th>Size</th>
          <th>Value</th>
          <th />
        </tr>
      </thead>
      <tbody>
        {artifacts.map((artifact) => (
          <tr key={artifact.name} data-artifact={artifact.name}>
            <td>{artifact.name}</td>
            <td>
              <code>{artifact.python_type ?? "?"}</code>
            </td>
            <td>{bytes(artifact.size)}</td>
            <td>{artifact.preview === null ? <span className="muted">(larger than 16 KiB)</span> : <code className="preview">{artifact.preview}</code>}</td>
            <td>
              <Link to={`/lineage/${task}/${encodeURIComponent(artifact.name)}`} data-lineage-link={artifact.name}>
                lineage
              </Link>
            </td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}
