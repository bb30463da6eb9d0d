"""Exported bundles are self-contained: they run after the origin datastore is gone, from a folder or S3."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FUNCTIONS_APP

FLOWER = {"sepal_length": 6.9, "sepal_width": 3.1, "petal_length": 5.4, "petal_width": 2.1}


@pytest.fixture
def throwaway_task(tmp_path: Path, iris_run: Path):
    """A fresh training run whose datastore the test may delete (the session run's metadata comes back after)."""
    from metaflow import Run, get_metadata, metadata

    shutil.copy(FUNCTIONS_APP / "train_flow.py", tmp_path)
    datastore = tmp_path / ".metaflow"
    subprocess.run(
        [sys.executable, "train_flow.py", "--datastore-root", str(datastore), "run", "--run-id-file", "run-id"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=300,
    )
    run_id = (tmp_path / "run-id").read_text().strip()
    previous = get_metadata()
    metadata(f"local@{tmp_path}")
    yield Run(f"IrisTrainFlow/{run_id}")["train"].task, datastore
    metadata(previous)


def test_bundle_in_a_folder_runs_after_the_datastore_is_deleted(throwaway_task, tmp_path: Path) -> None:
    import iris_functions
    from metaflow import JsonFunction, function_from_json

    task, datastore = throwaway_task
    bound = JsonFunction(iris_functions.predict, task=task)
    expected = function_from_json(bound.reference, backend="inprocess")(FLOWER)
    location = bound.export(str(tmp_path / "bundle"))
    shutil.rmtree(datastore)

    files = {p.relative_to(location).as_posix() for p in Path(location).rglob("*") if p.is_file()}
    assert {"reference.json", "requirements.lock"} <= files
    document = json.loads((Path(location) / "reference.json").read_text())
    assert document["store"]["type"] == document["task"]["store"]["type"] == "bundle"
    for backend in ("inprocess", "local"):
        with function_from_json(location, backend=backend) as fn:
            assert fn(FLOWER) == expected == {"prediction": 2}


def test_bundle_without_artifacts_still_reads_them_from_the_task(train_task, tmp_path: Path) -> None:
    import iris_functions
    from metaflow import JsonFunction, function_from_json

    location = JsonFunction(iris_functions.predict, task=train_task).export(
        str(tmp_path / "light"), include_artifacts=False
    )
    document = json.loads((Path(location) / "reference.json").read_text())
    assert document["task"]["store"]["type"] == "local"
    blobs = [p for p in (Path(location) / "blobs").rglob("*") if p.is_file() and not p.name.endswith("_meta")]
    assert len(blobs) == 1  # only the code archive
    with function_from_json(str(Path(location) / "reference.json"), backend="inprocess") as fn:
        assert fn(FLOWER) == {"prediction": 2}


def test_bundle_on_s3_round_trips(train_task, s3_bucket: str) -> None:
    import os

    import boto3
    import iris_functions
    from metaflow import JsonFunction, function_from_json

    destination = f"{s3_bucket}/predict/v1"
    location = JsonFunction(iris_functions.predict, task=train_task).export(destination)
    assert location == destination
    s3 = boto3.client("s3", endpoint_url=os.environ["METAFLOW_S3_ENDPOINT_URL"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="functions", Prefix="predict/v1/")["Contents"]}
    assert {"predict/v1/reference.json", "predict/v1/requirements.lock"} <= keys
    for backend in ("inprocess", "local"):
        with function_from_json(destination, backend=backend) as fn:
            assert fn(FLOWER) == {"prediction": 2}


def test_a_folder_without_a_reference_is_a_clear_error(tmp_path: Path) -> None:
    from metaflow import function_from_json

    from metaflow_stack.functions.errors import FunctionError

    with pytest.raises(FunctionError, match=r"no reference\.json"):
        function_from_json(str(tmp_path), backend="inprocess")
