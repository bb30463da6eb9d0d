"""Batch inference with Ray Data: a function over a JSON Lines or Parquet file, resumably.

The input is cut into shards of ``shard_size`` records by position. Ray Data
runs the function over the records of the shards not yet done with
``map_batches`` and an actor pool (each actor loads the function once, in its
environment), keeping input order; each shard's results are written to
``part-NNNNN.jsonl`` through a temporary file and a rename, so a shard is
either complete or absent. A rerun after a crash skips complete shards: no
record is lost or written twice. ``_batch.json`` records the input, the
reference and the shard size, and a rerun with different ones is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from metaflow_stack import ray_start
from metaflow_stack.functions import environment, loader
from metaflow_stack.functions.bundle import resolve_reference
from metaflow_stack.functions.errors import FunctionError

MANIFEST = "_batch.json"


@dataclass(frozen=True)
class BatchOptions:
    """Resources and sizes of a batch run."""

    batch_size: int = 256
    concurrency: int = 1
    num_cpus: float = 1
    num_gpus: float = 0
    shard_size: int = 10_000


class FunctionBatcher:
    """A Ray Data actor: loads the function once, maps batches of JSON records."""

    def __init__(self, reference_json: str, base: str | None) -> None:
        from metaflow_stack.functions import reference

        self._fn, self._params = loader.load(reference.parse(reference_json), base)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy

        results = [json.dumps(self._fn(json.loads(record), self._params)) for record in batch["record"]]
        return {"shard": batch["shard"], "result": numpy.array(results, dtype=object)}


def read_records(path: Path) -> list[str]:
    """The input's records as JSON texts, in order (``.jsonl`` or ``.parquet``)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return [json.dumps(row) for row in pyarrow.parquet.read_table(path).to_pylist()]
    if path.suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as lines:
            records = []
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        records.append(json.dumps(json.loads(line)))
                    except json.JSONDecodeError as exc:
                        raise FunctionError(f"{path}:{number} is not JSON: {exc}") from None
            return records
    raise FunctionError(f"unsupported input {path.name}", fix="give a .jsonl or .parquet file")


def _manifest(input_path: Path, reference_digest: str, shard_size: int, count: int) -> dict[str, Any]:
    digest = hashlib.sha256(input_path.read_bytes()).hexdigest()
    return {"input": digest, "reference": reference_digest, "shard_size": shard_size, "records": count}


def _part(output: Path, shard: int) -> Path:
    return output / f"part-{shard:05d}.jsonl"


def run_batch(source: Any, input_path: Path, output: Path, options: BatchOptions | None = None) -> dict[str, int]:
    """Run the function over ``input_path`` into ``output``; return counts of shards done and skipped."""
    import ray

    options = options or BatchOptions()
    ref, base = resolve_reference(source)
    records = read_records(input_path)
    output.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(input_path, ref.digest, options.shard_size, len(records))
    manifest_file = output / MANIFEST
    if manifest_file.exists() and json.loads(manifest_file.read_text()) != manifest:
        raise FunctionError(
            f"{output} holds a batch run of other input, function or shard size",
            fix="choose an empty output folder, or rerun with the same input, reference and --shard-size",
        )
    manifest_file.write_text(json.dumps(manifest, indent=2))

    shards = range((len(records) + options.shard_size - 1) // options.shard_size)
    pending = [s for s in shards if not _part(output, s).exists()]
    if not pending:
        return {"done": 0, "skipped": len(shards)}

    if not ray.is_initialized():
        ray_start.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    where = environment.interpreter(ref.environment)
    remote_args: dict[str, Any] = {}
    if where.pythonpath:
        remote_args["runtime_env"] = {"py_executable": str(where.python), "env_vars": {"PYTHONPATH": where.pythonpath}}

    items = [
        {"shard": shard, "record": record}
        for shard in pending
        for record in records[shard * options.shard_size : (shard + 1) * options.shard_size]
    ]
    dataset = ray.data.from_items(items).map_batches(
        FunctionBatcher,
        fn_constructor_args=(ref.to_json(), base),
        batch_size=options.batch_size,
        concurrency=options.concurrency,
        num_cpus=options.num_cpus,
        num_gpus=options.num_gpus,
        batch_format="numpy",
        **remote_args,
    )

    expected = {s: len(records[s * options.shard_size : (s + 1) * options.shard_size]) for s in pending}
    buffers: dict[int, list[str]] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(f"{ref.name} over {input_path.name}", total=sum(expected.values()))
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for shard, result in zip(batch["shard"].tolist(), batch["result"].tolist(), strict=True):
                buffers.setdefault(shard, []).append(result)
                if len(buffers[shard]) == expected[shard]:
                    temporary = _part(output, shard).with_suffix(".tmp")
                    temporary.write_text("\n".join(buffers.pop(shard)) + "\n", encoding="utf-8")
                    os.replace(temporary, _part(output, shard))  # a shard is whole or absent
            progress.update(task, advance=len(batch["shard"]))
    return {"done": len(pending), "skipped": len(shards) - len(pending)}


def read_results(output: Path) -> list[Any]:
    """Every result of a finished batch run, in input order."""
    manifest = json.loads((output / MANIFEST).read_text())
    shards = (manifest["records"] + manifest["shard_size"] - 1) // manifest["shard_size"]
    results: list[Any] = []
    for shard in range(shards):
        results.extend(json.loads(line) for line in _part(output, shard).read_text().splitlines())
    return results
