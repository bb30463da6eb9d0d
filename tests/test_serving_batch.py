"""Ray Data batch inference: the same answers as in-process, and crash-safe reruns."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import VENV_BIN, free_port, run_cli
from flowers import random_flowers

from metaflow_stack.serving.batch import read_results

pytestmark = pytest.mark.slow
RECORDS = 100_000
#: Records of the killed run that resumes.
RESUMED = 20_000


@pytest.fixture(scope="module")
def batch_input(train_task, tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """A saved reference, 100k flowers as JSON Lines, and the in-process answers."""
    import iris_functions
    from metaflow import JsonFunction, function_from_json

    folder = tmp_path_factory.mktemp("batch")
    reference = folder / "predict.json"
    reference.write_text(JsonFunction(iris_functions.predict, task=train_task).reference)
    flowers = random_flowers(RECORDS, seed=7)
    data = folder / "flowers.jsonl"
    data.write_text("".join(json.dumps(f) + "\n" for f in flowers))
    with function_from_json(str(reference), backend="inprocess") as fn:
        expected = fn.batch(flowers)
    yield reference, data, expected
    import ray

    ray.shutdown()


def _batch(reference: Path, data: Path, output: Path) -> list[str]:
    """``metaflow function batch``'s arguments for ``reference`` over ``data`` into ``output``."""
    return ["function", "batch", str(reference), "--input", str(data), "--output", str(output)]


def test_batch_over_100k_records_equals_the_in_process_results(batch_input, tmp_path: Path) -> None:
    reference, data, expected = batch_input
    result = run_cli(
        *_batch(reference, data, tmp_path / "out"),
        "--concurrency",
        "2",
        "--num-cpus",
        "0.5",
        "--batch-size",
        "2048",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "10 shard(s) written, 0 already done" in result.stdout
    assert read_results(tmp_path / "out") == expected


def test_a_killed_run_resumes_without_losing_or_repeating_records(batch_input, tmp_path: Path) -> None:
    """The resume path at a smaller width than the 100k above (twenty shards)."""
    reference, whole, expected = batch_input
    data, expected = tmp_path / "flowers.jsonl", expected[:RESUMED]
    with whole.open() as lines:
        data.write_text("".join(line for _, line in zip(range(RESUMED), lines, strict=False)))
    output = tmp_path / "out"
    command = [
        str(VENV_BIN / "metaflow"),
        *_batch(reference, data, output),
        "--shard-size",
        str(RESUMED // 20),
        "--batch-size",
        "500",
    ]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(output.glob("part-*.jsonl")) and first.poll() is None:
        time.sleep(0.05)
    # Frozen the moment its first shard is written, counted, then killed: whatever the machine's speed,
    # the count is of a run stopped mid-flight, and nothing is written between counting and killing.
    os.killpg(first.pid, signal.SIGSTOP)
    done_before = len(list(output.glob("part-*.jsonl")))
    _kill_session(first.pid)
    first.wait()
    assert 0 < done_before < 20

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{done_before} already done" in second.stdout
    assert read_results(output) == expected  # every record exactly once, in order
    assert not list(output.glob("*.tmp"))


def _kill_session(session: int) -> None:
    """SIGKILL every process of ``session``: the run, and Ray's workers, which Ray starts in process groups of
    their own (left running, they would still be busy with the killed run's batch while the next run's Ray
    starts on this two-core machine)."""
    for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getsid(pid) == session:
                os.kill(pid, signal.SIGKILL)


def test_no_ray_where_ray_address_points_is_said_in_one_line(batch_input, tmp_path: Path) -> None:
    """(An address nothing answers at, not ``auto``: with ``auto`` Ray takes any Ray of this machine's, and
    the pools' tests run theirs beside this module.)"""
    reference, data, _ = batch_input
    address = f"127.0.0.1:{free_port()}"
    result = run_cli(*_batch(reference, data, tmp_path / "o"), env={"RAY_ADDRESS": address})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"no Ray at {address}: " in result.stderr and "refused" in result.stderr
    assert "start Ray there (ray start --head), or unset RAY_ADDRESS" in " ".join(result.stderr.split())


def test_rerunning_with_another_shard_size_is_refused(batch_input, tmp_path: Path) -> None:
    reference, data, _ = batch_input
    output = tmp_path / "out"
    output.mkdir()
    (output / "_batch.json").write_text(json.dumps({"input": "other", "reference": "", "shard_size": 1, "records": 1}))
    result = run_cli(*_batch(reference, data, output))
    assert result.returncode == 1
    assert "holds a batch run of other input" in result.stderr


def test_malformed_input_line_is_named(batch_input, tmp_path: Path) -> None:
    reference, _, _ = batch_input
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sepal_length": 1}\n{oops\n')
    result = run_cli(*_batch(reference, bad, tmp_path / "o"))
    assert result.returncode == 1
    assert f"{bad}:2 is not JSON" in " ".join(result.stderr.split())
