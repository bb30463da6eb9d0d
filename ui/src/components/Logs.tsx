// A task's log: its last 1000 lines, refetched whenever the run changes (``version``) so a running task's
// output appears as the datastore receives it.
import { useEffect, useState } from "react";

import { apiPath, getJson, type LogWindow, RequestError } from "../api";
import { ErrorBox } from "./Status";

export function Logs({ pathspec, running, version }: { pathspec: string; running: boolean; version: number }) {
  const [stream, setStream] = useState<"stdout" | "stderr">("stdout");
  const [lines, setLines] = useState<string[]>([]);
  const [error, setError] = useState<RequestError | null>(null);
  const [truncated, setTruncated] = useState(false);

  useEffect(() => {
    let live = true;
    getJson<LogWindow>(`${apiPath("logs", pathspec)}/${stream}?tail=1000`)
      .then((window) => {
        if (!live) return;
        setLines(window.lines.map((line) => line.text));
        setTruncated(window.size > 0 && window.truncated);
        setError(null);
      })
      .catch((reason) => live && setError(reason as RequestError));
    return () => {
      live = false;
    };
  }, [pathspec, stream, version]);

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
      ) : (
        <pre className="log-text">
          {truncated && <span className="muted">… earlier lines not shown{"\n"}</span>}
          {lines.length === 0 ? <span className="muted">(empty)</span> : lines.join("\n")}
        </pre>
      )}
    </section>
  );
}
