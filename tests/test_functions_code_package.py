"""Modules beside the flow reach the function through the flow's Metaflow code package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FUNCTIONS_APP

FLOWER = {"sepal_length": 6.9, "sepal_width": 3.1, "petal_length": 5.4, "petal_width": 2.1}

HELPER = """
def label(prediction: int) -> str:
    return ["setosa", "versicolor", "virginica"][prediction]
"""

FUNCTION = """
from flow_helpers import label
from metaflow import FunctionParameters, json_function


@json_function
def predict_label(data: dict, params: FunctionParameters) -> dict:
    features = [data[f] for f in params.feature_names]
    return {"label": label(int(params.model.predict([features])[0]))}
"""


@pytest.mark.slow
def test_helper_module_beside_the_flow_travels_in_the_code_package(
    tmp_path: Path, iris_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metaflow import JsonFunction, Run, function_from_json, get_metadata, metadata

    flow_dir, functions_dir = tmp_path / "flow", tmp_path / "functions"
    flow_dir.mkdir()
    functions_dir.mkdir()
    shutil.copy(FUNCTIONS_APP / "train_flow.py", flow_dir)
    (flow_dir / "flow_helpers.py").write_text(HELPER)
    (functions_dir / "labelled.py").write_text(FUNCTION)
    subprocess.run(
        [
            sys.executable,
            "train_flow.py",
            "--datastore-root",
            str(flow_dir / ".metaflow"),
            "run",
            "--run-id-file",
            "id",
        ],
        cwd=flow_dir,
        env={**os.environ, "METAFLOW_FEAT_ALWAYS_UPLOAD_CODE_PACKAGE": "true"},
        check=True,
        capture_output=True,
        timeout=300,
    )
    monkeypatch.syspath_prepend(str(flow_dir))  # the binder sees the helper; the workers will not
    monkeypatch.syspath_prepend(str(functions_dir))
    previous = get_metadata()
    metadata(f"local@{flow_dir}")
    try:
        task = Run(f"IrisTrainFlow/{(flow_dir / 'id').read_text().strip()}")["train"].task
        from labelled import predict_label

        bound = JsonFunction(predict_label, task=task).bound
    finally:
        metadata(previous)
    assert bound.task.code_package is not None
    assert bound.function.files == ["labelled.py"]  # the helper is not in the function's own archive
    with function_from_json(bound, backend="local") as fn:
        assert fn(FLOWER) == {"label": "virginica"}
