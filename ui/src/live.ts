// Live data: fetch, then refetch whenever the server reports a change to a watched run.
import { useCallback, useEffect, useRef, useState } from "react";

import { getJson, RequestError } from "./api";

type Listener = (runs: string[]) => void;
const listeners = new Set<Listener>();
let source: EventSource | null = null;

/** One EventSource for the page, shared by every hook; it reconnects by itself. */
function subscribe(listener: Listener): () => void {
  listeners.add(listener);
  if (source === null) {
    source = new EventSource("/api/events");
    source.onmessage = (event) => {
      const runs = (JSON.parse(event.data) as { runs: string[] }).runs;
      for (const notify of listeners) notify(runs);
    };
  }
  return () => {
    listeners.delete(listener);
    if (listeners.size === 0 && source !== null) {
      source.close();
      source = null;
    }
  };
}

export interface Loaded<T> {
  data: T | null;
  error: RequestError | null;
  loading: boolean;
  /** How many times the data arrived: changes whenever a watched run changed. */
  version: number;
  reload: () => void;
}

/**
 * ``path`` fetched now and again (at most every ``minGapMs``) whenever a run matching ``watch``
 * changes: a run pathspec, or "*" for any run.
 */
export function useLive<T>(path: string | null, watch: string | null, minGapMs = 300): Loaded<T> {
  const [data, setData] = useState<T | null>(null);
  const [error, setError] = useState<RequestError | null>(null);
  const [loading, setLoading] = useState(true);
  const [version, setVersion] = useState(0);
  const generation = useRef(0);
  const timer = useRef<number | null>(null);

  const load = useCallback(() => {
    if (path === null) return;
    const mine = ++generation.current;
    getJson<T>(path)
      .then((body) => {
        if (mine !== generation.current) return;
        setData(body);
        setError(null);
        setVersion((v) => v + 1);
      })
      .catch((reason: unknown) => {
        if (mine !== generation.current) return;
        setError(reason instanceof RequestError ? reason : new RequestError(0, { code: "network", message: String(reason) }));
      })
      .finally(() => mine === generation.current && setLoading(false));
  }, [path]);

  useEffect(() => {
    setLoading(true);
    setData(null);
    load();
  }, [load]);

  useEffect(() => {
    if (watch === null) return;
    return subscribe((runs) => {
      // "*" from the server: the stream has just (re)subscribed (what changed before then reached no one),
      // or more runs changed than it tracks for a reader.
      if (watch !== "*" && !runs.includes(watch) && !runs.includes("*")) return;
      if (timer.current !== null) return;
      timer.current = window.setTimeout(() => {
        timer.current = null;
        load();
      }, minGapMs);
    });
  }, [watch, load, minGapMs]);

  return { data, error, loading, version, reload: load };
}
