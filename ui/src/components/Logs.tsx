// A task's log: its last 1000 lines, refetched whenever the run changes (``version``) so a running task's
// output appears as the datastore receives it. Until the first answer for this task and stream arrives the
// panel says it is loading, so an empty log is never claimed before it has been read.
import { useEffect, useState } from "react";

import { apiPath, getJson, type LogWindow, RequestError } from "../api";
import { ErrorBox } from "./Status";

interface Shown {
  source: string;
  log: LogWindow;
}

export function Logs({ pathspec, running, version }: { pathspec: string; running: boolean; version: number }) {
  const [stream, setStream] = useState<"stdout" | "stderr">("stdout");
  const [shown, setShown] = useState<Shown | null>(null);
  const [error, setError] = useState<RequestError | null>(null);
  const source = `${apiPath("logs", pathspec)}/${stream}`;

  useEffect(() => {
    let live = true;
    getJson<LogWindow>(`${source}?tail=1000`)
      .then((log) => {
        if (!live) return;
        setShown({ source, log });
        setError(null);
      })
      .catch((reason) => live && setError(reason as RequestError));
    return () => {
      live = false;
    };
  }, [source, version]);

  const log = shown?.source === source ? shown.log : null;
  return (
    <section className="logs" data-logs={pathspec}>
      <div className="tabs">
        {(["stdout", "stderr"] as const).map((name) => (
          <button key={name} className={name === stream ? "tab active" : "tab"} onClick={() => setStream(name)}>
            {name}
          </button>
        ))}
        {running && <span className="badge status-running">live</span>}
      </div>
      {error ? (
        <ErrorBox title="The log could not be read" error={error.body} />
      ) : log === null ? (
        <pre className="log-text" aria-busy="true">
          <span className="muted">loading…</span>
        </pre>
      ) : (
        <pre className="log-text" data-loaded={log.stream}>
          {log.size > 0 && log.truncated && <span className="muted">… earlier lines not shown{"\n"}</span>}
          {log.lines.length === 0 ? <span className="muted">(empty)</span> : log.lines.map((l) => l.text).join("\n")}
        </pre>
      )}
    </section>
  );
}
