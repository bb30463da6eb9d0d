"""``metaflow ui`` on a real local datastore: its JSON API, and the front end
in Debian's Chromium (Playwright): the DAG of a branch + nested foreach flow,
live updates of a running flow, dark mode, bad paths. Screenshots land in
``.stack/test-results/ui``."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LOOPBACK, SCREENSHOTS, VENV_BIN, fuzz_finds_nothing
from httpx_sse import connect_sse
from playwright.sync_api import Route, expect
from service_servers import metaflow_ui, run_flow, start_service

pytestmark = pytest.mark.slow

#: Debian's Chromium here; CI elsewhere names its own Chrome.
SHOTS = SCREENSHOTS / "ui"
FLOW = "branch_foreach_flow.py"
STEPS = {"start", "fan", "each", "leaf", "inner_join", "fan_join", "side", "join", "end"}
EDGES = {
    "start->fan",
    "start->side",
    "fan->each",
    "each->leaf",
    "leaf->inner_join",
    "inner_join->fan_join",
    "fan_join->join",
    "side->join",
    "join->end",
}


@dataclass
class Ui:
    url: str
    root: Path
    runs: list[str]
    marker: Path
    service_url: str | None

    def flow_env(self, **extra: str) -> dict[str, str]:
        """The flow's environment: where it records, and where its sneaky artifact would leave a mark."""
        metadata = (
            {"METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": self.service_url}
            if self.service_url
            else {"METAFLOW_DEFAULT_METADATA": "local"}
        )
        return {**metadata, "UI_SNEAKY_MARKER": str(self.marker), **extra}


@pytest.fixture(scope="module", params=["local", "service"])
def ui(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    """Two finished runs (alpha 0.5 and 0.9) and ``metaflow ui`` serving them: from the local datastore,
    or from the metadata service that recorded them (values read from the datastore root)."""
    root = tmp_path_factory.mktemp(f"ui-{request.param}")
    service = None
    if request.param == "service":
        service = start_service(str(root / "metadata.db"), root / "service.log", log_roots=(str(root / ".metaflow"),))
    shell = Ui("", root, [], root / "sneaky-was-unpickled", service.url if service else None)
    try:
        for alpha in ("0.5", "0.9"):
            done = run_flow(
                root,
                "run",
                "--alpha",
                alpha,
                "--run-id-file",
                "run-id",
                service_url=shell.service_url,
                flow=FLOW,
                env=shell.flow_env(),
            )
            assert done.returncode == 0, done.stderr[-3000:]
            shell.runs.append(f"BranchForeachFlow/{(root / 'run-id').read_text()}")
        with metaflow_ui(root / ".metaflow", *(["--service-url", service.url] if service else [])) as shell.url:
            yield shell
    finally:
        if service is not None:
            service.stop()


def test_the_api_lists_runs_and_draws_the_recorded_graph(ui: Ui) -> None:
    listed = httpx.get(f"{ui.url}/api/runs", params={"flow": "BranchForeachFlow"}).json()
    assert [run["pathspec"] for run in listed["runs"]] == ui.runs[::-1]  # newest first
    assert {run["status"] for run in listed["runs"]} == {"completed"}
    assert all(run["finished_at"] > run["started_at"] for run in listed["runs"])
    assert httpx.get(f"{ui.url}/api/runs", params={"status": "failed"}).json()["runs"] == []

    page = httpx.get(f"{ui.url}/api/runs/{ui.runs[1]}").json()
    steps = page["graph"]["steps"]
    assert set(steps) == STEPS
    assert {f"{name}->{after}" for name, step in steps.items() for after in step["next"]} == EDGES
    assert steps["fan"]["type"] == "split-foreach" and steps["fan"]["foreach_artifact"] == "items"
    assert page["graph"]["parameters"] == {"alpha": "0.9"}
    leaves = [task for task in page["tasks"] if task["step_name"] == "leaf"]
    assert sorted(tuple(task["foreach"]) for task in leaves) == [
        (f"items={item}", f"inner={inner}") for item in "abc" for inner in (1, 2)
    ]  # each item named by its value, outermost first
    assert page["summary"]["status"] == "completed" and len(page["tasks"]) == 18
    order = [step["step_name"] for step in page["summary"]["steps"]]
    assert order[0] == "start" and order[-1] == "end" and order.index("each") < order.index("leaf")


def test_previews_show_plain_data_and_never_run_artifact_code(ui: Ui) -> None:
    page = httpx.get(f"{ui.url}/api/runs/{ui.runs[0]}").json()
    fan, side = (next(t for t in page["tasks"] if t["step_name"] == name)["pathspec"] for name in ("fan", "side"))
    items = {a["name"]: a for a in httpx.get(f"{ui.url}/api/tasks/{fan}").json()["artifacts"]}["items"]
    assert items["preview"] == "['a', 'b', 'c']" and items["python_type"] == "list" and items["size"] > 0
    sneaky = httpx.get(f"{ui.url}/api/artifacts/{side}/sneaky").json()
    assert sneaky["preview"].startswith("(not previewed: needs ") and "_sneaky_restore" in sneaky["preview"]
    assert not ui.marker.exists(), "the UI server ran an artifact's code"
    task = httpx.get(f"{ui.url}/api/tasks/{side}").json()
    assert [a["ok"] for a in task["attempts"]] == [True]
    assert {"ds-type", "attempt_ok"} <= {m["field"] for m in task["metadata"]}


def test_the_event_stream_first_says_it_is_subscribed(ui: Ui) -> None:
    with httpx.Client(timeout=30) as client, connect_sse(client, "GET", f"{ui.url}/api/events") as sse:
        first = next(sse.iter_sse())
    assert json.loads(first.data) == {"runs": ["*"]}  # refetch everything: earlier changes reached no one


def test_bad_paths_and_parameters_are_json_errors(ui: Ui) -> None:
    missing = httpx.get(f"{ui.url}/api/runs/BranchForeachFlow/123456")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert "BranchForeachFlow/123456" in missing.json()["message"]
    bad = httpx.get(f"{ui.url}/api/runs", params={"limit": 0})
    assert bad.status_code == 400 and bad.json()["code"] == "bad_parameter"
    assert httpx.get(f"{ui.url}/api/runs", params={"status": "exploded"}).status_code == 400
    assert httpx.get(f"{ui.url}/api/no/such/route").status_code == 404
    page = httpx.get(f"{ui.url}/no/such/page")
    assert page.status_code == 200 and 'id="root"' in page.text  # the front end routes it, to its own 404 page


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_in_the_api(ui: Ui, tmp_path: Path) -> None:
    report = fuzz_finds_nothing(ui.url, tmp_path, exclude=("/api/events",))
    assert int(re.search(r"Tested: (\d+)", report)[1]) >= 10  # every route but the stream


def test_a_value_the_ui_may_not_read_is_an_error_on_that_artifact_only(ui: Ui) -> None:
    from fastapi.testclient import TestClient

    from metaflow_stack.datastore.blobs import Blobs
    from metaflow_stack.ui.app import create_app
    from metaflow_stack.ui.local_runs import LocalRuns
    from metaflow_stack.ui.service_runs import ServiceRuns

    if ui.service_url:
        source = ServiceRuns(ui.service_url, ())  # no datastore root allowed
    else:
        source = LocalRuns(ui.root / ".metaflow")
        source.blobs = Blobs((str(ui.root / "elsewhere"),))
    with TestClient(create_app(source, live=False), base_url=LOOPBACK) as client:
        fan = next(t for t in client.get(f"/api/runs/{ui.runs[0]}").json()["tasks"] if t["step_name"] == "fan")
        task = client.get(f"/api/tasks/{fan['pathspec']}")
    assert task.status_code == 200
    items = {a["name"]: a for a in task.json()["artifacts"]}["items"]
    assert items["preview"].startswith("(not readable: ") and items["size"] > 0


def _stored(root: Path, flow: str, data: bytes) -> str:
    """``data`` stored as Metaflow stores a value (gzip, under its content hash) under the local ``root``."""
    sha = hashlib.sha1(data).hexdigest()
    path = root / flow / "data" / sha[:2] / sha
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data))
    return sha


def test_a_value_linked_out_of_the_datastore_is_not_read(tmp_path: Path) -> None:
    """A task writes the datastore: a link it planted there, to a file or a folder, is not followed."""
    from metaflow_stack.datastore.blobs import Blobs
    from metaflow_stack.errors import DatastoreError

    outside, root = tmp_path / "outside", tmp_path / "root"
    linked_file = _stored(outside, "F", pickle.dumps("the UI's own key"))
    (root / "F" / "data" / linked_file[:2]).mkdir(parents=True)
    (root / "F" / "data" / linked_file[:2] / linked_file).symlink_to(
        outside / "F" / "data" / linked_file[:2] / linked_file
    )
    in_linked_folder = _stored(outside, "G", pickle.dumps("a file of the machine"))
    (root / "G").mkdir()
    (root / "G" / "data").symlink_to(outside / "G" / "data")
    blobs = Blobs((str(root),))
    for flow, sha in (("F", linked_file), ("G", in_linked_folder)):
        with pytest.raises(DatastoreError) as refused:
            blobs.read(flow, sha)
        assert refused.value.code == "not_found"
    assert Blobs((str(outside),)).read("F", linked_file) == pickle.dumps("the UI's own key")  # (a real value)


@pytest.mark.parametrize(
    "stored",
    [b"top secret", b"\x1f\x8b\x08\x00" + bytes(6) + b"\xff" * 20],
    ids=["not gzip", "a broken deflate stream"],
)
def test_a_damaged_value_is_an_error_that_quotes_none_of_its_bytes(tmp_path: Path, stored: bytes) -> None:
    from metaflow_stack.datastore.blobs import Blobs
    from metaflow_stack.errors import DatastoreError

    sha = "ab" * 20
    (tmp_path / "F" / "data" / "ab").mkdir(parents=True)
    (tmp_path / "F" / "data" / "ab" / sha).write_bytes(stored)
    with pytest.raises(DatastoreError) as damaged:
        Blobs((str(tmp_path),)).read("F", sha)
    assert damaged.value.code == "bad_artifact" and "b'" not in damaged.value.message, damaged.value.message
    assert damaged.value.message.startswith(f"the value {sha} of F cannot be read: ")


def _recorded_graph(root: Path, sha: str, size: int | None) -> Any:
    """A source whose runs all record ``_graph_info`` as ``sha``, of ``size`` bytes as the task said."""
    from metaflow_stack.datastore.blobs import Blobs
    from metaflow_stack.ui.details import Details

    class RecordedGraph(Details):
        def parameters_artifacts(self, flow: str, run: str) -> dict[str, tuple[str, int | None]]:
            return {"_graph_info": (sha, size)}

    source = RecordedGraph()
    source.blobs = Blobs((str(root),))
    return source


def _graph(steps: dict[str, dict]) -> bytes:
    """A ``_graph_info`` pickle as Metaflow records it."""
    return pickle.dumps({"steps": steps, "start_step": "start", "end_step": "end", "parameters": []})


def test_a_recorded_graph_whose_hashes_or_sizes_are_not_text_and_numbers_is_not_recorded(tmp_path: Path) -> None:
    """A run's ``_parameters`` file is written by its task: a hash that is not text made every graph request a
    500 (a traceback), a size that is not a number was passed on as one."""
    from local_metadata import local_task

    from metaflow_stack.agent.source import AgentError
    from metaflow_stack.ui.local_runs import LocalRuns

    local_task(tmp_path)
    parameters = tmp_path / "F" / "1" / "_parameters" / "0"
    parameters.mkdir(parents=True)
    objects = {"_graph_info": 5, "alpha": "ab12", "beta": "cd34", "gamma": "ef56"}
    info = {"alpha": {"size": "big"}, "beta": "not an object", "gamma": {"size": 7}}
    (parameters / "0.data.json").write_text(json.dumps({"objects": objects, "info": info}))
    runs = LocalRuns(tmp_path)
    assert runs.parameters_artifacts("F", "1") == {"alpha": ("ab12", None), "gamma": ("ef56", 7)}
    with pytest.raises(AgentError) as missing:
        runs.graph("F", "1")
    assert missing.value.code == "not_found"


def test_a_graph_recorded_larger_than_a_preview_is_not_read(tmp_path: Path) -> None:
    from metaflow_stack.agent.source import AgentError

    source = _recorded_graph(tmp_path, _stored(tmp_path, "F", _graph({"start": {"next": ["end"]}})), 2 * 2**20)
    with pytest.raises(AgentError) as refused:
        source.graph("F", "1")
    assert refused.value.code == "too_large" and source.blobs.reads == 0


def test_a_graph_that_understates_its_size_is_read_no_further_than_a_preview(tmp_path: Path) -> None:
    from metaflow_stack.agent.source import AgentError
    from metaflow_stack.datastore.previews import MAX_PREVIEW_BYTES
    from metaflow_stack.ui.details import CACHED_GRAPH_BYTES

    big = _graph({"start": {"doc": "x" * 2 * 2**20}})  # 2 MiB, a few KB stored, said to be 100 bytes
    source = _recorded_graph(tmp_path, _stored(tmp_path, "F", big), 100)
    read, sizes = source.blobs.read, []
    source.blobs.read = lambda *args, **kwargs: sizes.append(len(data := read(*args, **kwargs))) or data
    with pytest.raises(AgentError) as refused:
        source.graph("F", "1")
    # (first as a graph small enough to keep might be: no further than that)
    assert refused.value.code == "too_large" and sizes == [CACHED_GRAPH_BYTES + 1, MAX_PREVIEW_BYTES + 1]


def test_a_graph_sharing_one_long_docstring_between_its_steps_is_refused(tmp_path: Path) -> None:
    """One 100 KB docstring on each of 2,000 steps: a 130 KB pickle, 200 MB of JSON."""
    from metaflow_stack.agent.source import AgentError

    doc = "x" * 100_000
    shared = _graph({f"step{i}": {"doc": doc} for i in range(2_000)})
    source = _recorded_graph(tmp_path, _stored(tmp_path, "F", shared), len(shared))
    with pytest.raises(AgentError) as refused:
        source.graph("F", "1")
    assert refused.value.code == "too_large"


def test_a_graph_is_read_once_for_every_run_that_records_it(tmp_path: Path) -> None:
    recorded = _graph({"start": {"type": "start", "next": ["end"]}, "end": {"type": "end"}})
    source = _recorded_graph(tmp_path, _stored(tmp_path, "F", recorded), len(recorded))
    first, again = source.graph("F", "1"), source.graph("F", "2")
    assert first == again and first["steps"]["start"]["next"] == ["end"]
    assert source.blobs.reads == 1


def test_a_graph_too_large_to_keep_is_read_for_each_request(tmp_path: Path) -> None:
    """A run may record a graph of up to a preview's megabyte, whose parse holds tens of MB: the UI keeps
    parsed only graphs the size Metaflow's are, so 64 runs cannot make it hold gigabytes."""
    from metaflow_stack.datastore.previews import MAX_PREVIEW_BYTES
    from metaflow_stack.ui.details import CACHED_GRAPH_BYTES

    recorded = _graph({f"step{i}": {"type": "linear", "doc": f"{i}" * 50} for i in range(3_000)})
    assert CACHED_GRAPH_BYTES < len(recorded) < MAX_PREVIEW_BYTES
    for said in (len(recorded), 100):  # (its size as recorded, or understated: a task writes it)
        source = _recorded_graph(tmp_path / str(said), _stored(tmp_path / str(said), "F", recorded), said)
        first, again = source.graph("F", "1"), source.graph("F", "1")
        assert first == again and len(first["steps"]) == 3_000
        assert source.blobs.reads == (2 if said == len(recorded) else 3)  # (understated: the small read, once)


def test_the_run_page_draws_every_step_edge_and_foreach_item(ui: Ui, chromium) -> None:
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{ui.url}/{ui.runs[1]}")
    # Playwright's assertions retry until the page has drawn (or their timeout), so none reads a half-drawn page.
    expect(page.locator("svg.dag [data-step]")).to_have_count(len(STEPS))
    expect(page.locator("svg.dag [data-edge]")).to_have_count(len(EDGES))
    assert {node.get_attribute("data-step") for node in page.query_selector_all("svg.dag [data-step]")} == STEPS
    assert {edge.get_attribute("data-edge") for edge in page.query_selector_all("svg.dag [data-edge]")} == EDGES
    expect(page.locator("svg.dag [data-step]:not([data-status='completed'])")).to_have_count(0)
    expect(page.locator("[data-step='leaf'] [data-items]")).to_have_attribute("data-items", "6")
    expect(page.locator("[data-step='leaf'] rect.item")).to_have_count(6)
    expect(page.locator("[data-parameter='alpha'] code")).to_have_text("0.9")
    expect(page.locator("svg.timeline [data-bar]")).to_have_count(18)
    page.screenshot(path=SHOTS / "run-page.png", full_page=True)

    page.locator("[data-step='leaf'] rect.item").first.click()  # an item's log, on the same page
    expect(page.locator("[data-logs] .log-text[data-loaded='stdout']")).to_contain_text("scored")
    page.close()


def test_dark_mode_follows_the_system_and_the_toggle_persists(ui: Ui, chromium) -> None:
    dark = chromium.new_context(color_scheme="dark", viewport={"width": 1400, "height": 900})
    page = dark.new_page()
    page.goto(f"{ui.url}/")
    page.wait_for_selector("[data-run]")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.screenshot(path=SHOTS / "runs-dark.png")
    page.click("[data-theme-toggle]")
    expect(page.locator("html")).to_have_attribute("data-theme", "light")
    expect(page.locator("body")).not_to_have_css("background-color", background)
    page.reload()
    page.wait_for_selector("[data-run]")
    expect(page.locator("html")).to_have_attribute("data-theme", "light")  # the choice outlives the page
    page.screenshot(path=SHOTS / "runs-light.png")
    dark.close()
    light = chromium.new_context(color_scheme="light")
    fresh = light.new_page()
    fresh.goto(f"{ui.url}/")
    expect(fresh.locator("html")).to_have_attribute("data-theme", "light")
    light.close()


def test_an_unknown_page_says_so(ui: Ui, chromium) -> None:
    page = chromium.new_page()
    page.goto(f"{ui.url}/no/such/page/at/all/here")
    expect(page.locator("h1")).to_have_text("Not found")
    page.goto(f"{ui.url}/BranchForeachFlow/123456")
    expect(page.locator("[role='alert']")).to_contain_text("does not exist")
    page.close()


def test_a_running_flow_updates_live_without_a_reload(ui: Ui, chromium) -> None:
    """The page's event stream is held until the leaves run, so their events reach no subscriber (as when
    they start between the page's first fetch and its stream connecting): the stream's first event, sent
    once it is subscribed, makes the page refetch and show them."""
    start_gate, leaf_gate = ui.root / "start-gate", ui.root / "gate"
    start_gate.touch()
    leaf_gate.touch()
    gates = {"UI_START_GATE": str(start_gate), "UI_GATE": str(leaf_gate)}
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **ui.flow_env(**gates)}
    flow = subprocess.Popen(
        [sys.executable, FLOW, "--datastore-root", str(ui.root / ".metaflow"), "run", "--run-id-file", "live-id"],
        cwd=ui.root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (ui.root / "live-id").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        run = f"BranchForeachFlow/{(ui.root / 'live-id').read_text()}"
        _wait_for_running(ui, run, "start", 1)  # (the run id is written before its first task)
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        held: list[Route] = []
        page.route("**/api/events", lambda route: held.append(route))
        page.goto(f"{ui.url}/{run}")
        page.wait_for_selector("[data-step='start'][data-status='running']", timeout=120_000)
        assert len(held) == 1, "the page never opened its event stream, or opened several"
        start_gate.unlink()
        _wait_for_running(ui, run, "leaf", 6)  # each waits at its gate
        time.sleep(1)  # the leaves' last writes, published to no one
        assert page.locator("[data-step='leaf'][data-status='running']").count() == 0  # not fetched since
        held[0].continue_()
        page.unroute("**/api/events")  # (a reconnection goes straight through)
        page.wait_for_selector("[data-step='leaf'][data-status='running']", timeout=30_000)
        page.evaluate("window.__stillTheSamePage = true")
        page.screenshot(path=SHOTS / "run-page-live.png", full_page=True)
        leaf_gate.unlink()
        page.wait_for_selector("[data-step='end'][data-status='completed']", timeout=120_000)
        assert page.evaluate("window.__stillTheSamePage") is True  # updated in place, never reloaded
        expect(page.locator("h1 [data-status]")).to_have_attribute("data-status", "completed")
        page.close()
        assert flow.wait(timeout=120) == 0
    finally:
        start_gate.unlink(missing_ok=True)
        leaf_gate.unlink(missing_ok=True)
        if flow.poll() is None:
            flow.terminate()
            flow.wait(timeout=30)


def _wait_for_running(ui: Ui, run: str, step: str, count: int) -> None:
    """Until the UI's API says ``count`` tasks of ``run``'s ``step`` are running."""
    deadline, tasks = time.monotonic() + 120, []
    while time.monotonic() < deadline:
        tasks = httpx.get(f"{ui.url}/api/runs/{run}").json().get("tasks", [])
        if sum(task["step_name"] == step and task["status"] == "running" for task in tasks) == count:
            return
        time.sleep(0.3)
    raise AssertionError(f"{count} {step} tasks of {run} were not running within 120 s: {tasks}")


def test_two_runs_compare_by_parameter_metric_result_and_timing(ui: Ui, chromium) -> None:
    older, newer = ui.runs
    compared = httpx.get(f"{ui.url}/api/compare", params={"a": older, "b": newer}).json()
    assert compared["parameters"] == [{"name": "alpha", "a": "0.5", "b": "0.9", "changed": True}]
    accuracy = {m["name"]: m for m in compared["metrics"]}["accuracy"]
    assert (accuracy["a"], accuracy["b"], round(accuracy["delta"], 4)) == (0.85, 0.89, 0.04)
    results = {r["name"]: r for r in compared["results"]}
    assert results["model_name"]["same"] and not results["accuracy"]["same"]
    assert {s["step"] for s in compared["steps"]} == STEPS
    missing = httpx.get(f"{ui.url}/api/compare", params={"a": older, "b": "BranchForeachFlow/123456"})
    assert missing.status_code == 404 and "123456" in missing.json()["message"]

    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{ui.url}/?flow=BranchForeachFlow")
    page.check(f"[data-run='{older}'] input[type=checkbox]")
    page.check(f"[data-run='{newer}'] input[type=checkbox]")
    page.click("[data-compare]")
    changed = page.locator("[data-compare-parameter='alpha'][data-changed='true']")
    expect(changed).to_contain_text("0.5")
    expect(changed).to_contain_text("0.9")
    expect(page.locator("[data-metric='accuracy']")).to_contain_text("+0.04")
    expect(page.locator("[data-result='model_name']")).to_have_attribute("data-same", "true")
    page.screenshot(path=SHOTS / "compare.png", full_page=True)
    page.close()


def test_lineage_follows_a_value_through_the_dag_and_into_other_runs(ui: Ui, chromium) -> None:
    older, newer = ui.runs
    tasks = httpx.get(f"{ui.url}/api/runs/{older}").json()["tasks"]
    fan, start = (next(t["pathspec"] for t in tasks if t["step_name"] == name) for name in ("fan", "start"))
    items = httpx.get(f"{ui.url}/api/lineage/{fan}/items").json()
    assert items["produced_in"] == ["fan"]
    assert {"each", "leaf"} <= set(items["carried_into"]) and "side" not in items["carried_into"]
    roles = {s["step"]: s["role"] for s in items["steps"]}
    assert (roles["start"], roles["side"], roles["inner_join"]) == ("absent", "absent", "absent")  # joins merge nothing
    elsewhere = {r["pathspec"].rsplit("/", 1)[0] for r in items["elsewhere"]["records"]}
    assert {f"{newer}/fan", f"{newer}/each", f"{newer}/leaf"} <= elsewhere  # the same list, by hash, in other runs
    assert {path.rsplit("/", 1)[1] for path in elsewhere} == {"fan", "each", "leaf"}

    alpha = httpx.get(f"{ui.url}/api/lineage/{start}/alpha").json()
    assert alpha["produced_in"] == ["_parameters"] and "start" in alpha["carried_into"]
    assert not any(r["pathspec"].startswith(newer) for r in alpha["elsewhere"]["records"])  # 0.9 there, not 0.5
    missing = httpx.get(f"{ui.url}/api/lineage/{fan}/no_such_artifact")
    assert missing.status_code == 404 and "no_such_artifact" in missing.json()["message"]

    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{ui.url}/{fan}")
    page.click("[data-lineage-link='items']")
    page.wait_for_selector("[data-step='fan'][data-role='produced']")
    expect(page.locator("[data-step='each']")).to_have_attribute("data-role", "carried")
    expect(page.locator("[data-step='side']")).to_have_attribute("data-role", "absent")
    page.wait_for_selector(f"[data-elsewhere-run='{newer}'] [data-elsewhere-step='leaf']")
    page.screenshot(path=SHOTS / "lineage.png", full_page=True)
    page.close()


def test_a_tasks_card_is_listed_and_shown_sandboxed(ui: Ui, chromium) -> None:
    tasks = httpx.get(f"{ui.url}/api/runs/{ui.runs[0]}").json()["tasks"]
    fan, side = (next(t["pathspec"] for t in tasks if t["step_name"] == name) for name in ("fan", "side"))
    listed = httpx.get(f"{ui.url}/api/tasks/{fan}").json()
    assert [(c["type"], c["id"]) for c in listed["cards"]] == [("blank", "summary")] and listed["cards_error"] is None
    assert httpx.get(f"{ui.url}/api/tasks/{side}").json()["cards"] == []
    card = httpx.get(f"{ui.url}/api/cards/{fan}/{listed['cards'][0]['file']}")
    assert card.status_code == 200 and card.headers["content-type"].startswith("text/html")
    assert card.headers["content-security-policy"].startswith("sandbox allow-scripts;") and "<html" in card.text
    assert httpx.get(f"{ui.url}/api/cards/{fan}/blank-summary-0000.html").status_code == 404
    assert httpx.get(f"{ui.url}/api/cards/{fan}/..%2F..%2Fsecret.html").status_code in (400, 404)

    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{ui.url}/{fan}")
    frame = page.frame_locator("iframe[title='card summary']")
    frame.get_by_text("Fanning out over 3 items").wait_for(timeout=30_000)  # the card's own scripts drew it
    expect(page.locator("iframe[title='card summary']")).to_have_attribute("sandbox", "allow-scripts")
    page.screenshot(path=SHOTS / "task-card.png", full_page=True)
    page.close()


def test_a_card_that_is_a_link_or_not_a_file_is_neither_listed_nor_served(tmp_path: Path) -> None:
    """A task writes its cards: one linked to the UI's own files, or in a linked folder, or a FIFO (which
    would hold the reader forever), is not a card."""
    from metaflow_stack.datastore.blobs import Blobs
    from metaflow_stack.datastore.cards import Cards
    from metaflow_stack.errors import DatastoreError

    root, secret = tmp_path / "root", tmp_path / "secret.txt"
    secret.write_text("the UI's own key")
    cards = root / "mf.cards/F/runs/1/steps/s/tasks/2/cards"
    cards.mkdir(parents=True)
    (cards / "default-abc-111.html").write_text("<html>a card</html>")
    (cards / "default-abc-123.html").symlink_to(secret)
    os.mkfifo(cards / "default-abc-456.html")
    (tmp_path / "elsewhere/cards").mkdir(parents=True)
    (tmp_path / "elsewhere/cards/default-abc-789.html").write_text("the UI's own page")
    (root / "mf.cards/F/runs/1/steps/s/tasks/3").symlink_to(tmp_path / "elsewhere")
    reader = Cards(Blobs((str(root),)))
    assert [card["file"] for card in reader.list("F", "1", "s", "2")] == ["default-abc-111.html"]
    assert reader.read("F", "1", "s", "2", "default-abc-111.html") == b"<html>a card</html>"
    assert reader.list("F", "1", "s", "3") == []
    for task, file in (("2", "default-abc-123.html"), ("2", "default-abc-456.html"), ("3", "default-abc-789.html")):
        with pytest.raises(DatastoreError) as refused:
            reader.read("F", "1", "s", task, file)
        assert refused.value.code == "not_found"


def _verification(value: dict, attempt: int) -> dict:
    """A ``confidential-verification`` record as the service lists a task's metadata."""
    return {"field_name": "confidential-verification", "value": json.dumps(value), "type": "confidential-verification",
            "tags": [f"attempt_id:{attempt}"], "ts_epoch": 5_000 + attempt}  # fmt: skip


def test_a_task_page_shows_verification_records_that_conflict_as_such_never_attested() -> None:
    """The launcher records one verification per attempt before the step's code runs; the step may record
    more, and the newest was shown as "attested". Unsigned, neither is shown then; and a record tagged with an
    attempt that never started makes no attempt whose one record would be shown."""
    from metaflow_stack.ui.local_runs import task_detail

    started = [{"field_name": "attempt", "value": "0", "type": "attempt", "tags": ["attempt_id:0"], "ts_epoch": 1}]
    launchers = _verification({"attested": False, "mode": "direct"}, 0)
    forged = _verification({"attested": True, "mode": "sgx", "policy": "prod"}, 0)
    ahead = _verification({"attested": True, "mode": "sgx", "policy": "prod"}, 9)
    assert task_detail("F/1/s/2", {}, [*started, launchers, ahead])["confidential"]["mode"] == "direct"
    shown = task_detail("F/1/s/2", {}, [*started, launchers, forged])["confidential"]
    assert shown["conflicting"] is True and shown["attested"] is False and shown["policy"] is None


def test_a_task_pages_files_and_tags_without_an_attempt_number_are_no_attempts(tmp_path: Path) -> None:
    """``x.attempt.json`` or an ``attempt_id:x`` tag, which a step can write, made its task page a 500."""
    from local_metadata import local_task, metadatum

    from metaflow_stack.ui.local_runs import LocalRuns

    task = local_task(tmp_path)
    (task / "x.attempt.json").write_text('{"time": 3}')
    metadatum(task, "note", "hello", "x")
    (task / "_meta" / "sysmeta_deep_1.json").write_text("[" * 200_000)
    detail = LocalRuns(tmp_path).task_detail(["F", "1", "s", "2"])
    assert [a["attempt"] for a in detail["attempts"]] == [0] and detail["attempts"][0]["ok"] is True
    assert {(row["field"], row["attempt"]) for row in detail["metadata"]} >= {("note", 0)}


def test_on_every_interface_the_ui_prints_a_link_this_machine_opens_and_no_key(tmp_path: Path) -> None:
    # As in its image: bound to 0.0.0.0 with a key, its output collected (not a terminal).
    command = [str(VENV_BIN / "metaflow"), "ui", "--host", "0.0.0.0", "--port", "0", "--no-browser"]
    command += ["--datastore-root", str(tmp_path)]
    key = "a-key-that-must-stay-out-of-logs"
    server = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "METAFLOW_STACK_AUTH_KEY": key},
    )
    try:
        lines = [server.stderr.readline() for _ in range(2)]
        assert lines[0].startswith("Metaflow Stack UI on http://127.0.0.1:"), lines
        port = re.search(r":(\d+)/", lines[0])[1]
        assert lines[1].strip() == f"sign in (once per browser): http://127.0.0.1:{port}/sign-in?key=<your key>"
        assert key not in "".join(lines)
    finally:
        server.terminate()
        server.wait(timeout=30)
