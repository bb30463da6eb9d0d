"""The metadata service's HTTP API in process (FastAPI's test client over the
real app and a real SQLite file): compatible shapes, opt-in pages and filters,
status tracking, and every kind of bad input."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import LOOPBACK, fuzz_finds_nothing
from fastapi.testclient import TestClient

from metaflow_stack.datastore.task_metadata import FOREACH_CHARS, FOREACH_ITEMS, MESSAGE_CHARS
from metaflow_stack.service.app import CAPABILITIES, SERVICE_VERSION, ServiceConfig, create_app

SYSTEM_TAGS = ["metaflow_version:2.19.39", "runtime:dev", "user:ana"]
RUN_KEYS = {"flow_id", "run_number", "user_name", "ts_epoch", "tags", "system_tags", "last_heartbeat_ts"}
TASK_KEYS = {
    "flow_id",
    "run_number",
    "step_name",
    "task_id",
    "user_name",
    "ts_epoch",
    "tags",
    "system_tags",
    "last_heartbeat_ts",
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ServiceConfig(database_url=str(tmp_path / "m.db"))), base_url=LOOPBACK) as c:
        yield c


def new_run(client: TestClient, flow: str = "F", tags: list[str] | None = None, user: str = "ana", **body) -> dict:
    client.post(f"/flows/{flow}", json={"flow_id": flow})
    answer = client.post(
        f"/flows/{flow}/run", json={"user_name": user, "tags": tags or [], "system_tags": SYSTEM_TAGS, **body}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def new_task(client: TestClient, flow: str, run, step: str, **body) -> dict:
    client.post(f"/flows/{flow}/runs/{run}/steps/{step}/step", json={"user_name": "ana"})
    answer = client.post(
        f"/flows/{flow}/runs/{run}/steps/{step}/task", json={"user_name": "ana", "system_tags": SYSTEM_TAGS, **body}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def attempt(client: TestClient, task: dict, number: int, ok: bool | None, exception: dict | None = None) -> None:
    path = (
        f"/flows/{task['flow_id']}/runs/{task['run_number']}/steps/{task['step_name']}/tasks/{task['task_id']}/metadata"
    )
    tags = [f"attempt_id:{number}"]
    data = [{"field_name": "attempt", "value": str(number), "type": "attempt", "tags": tags}]
    if ok is not None:
        data.append({"field_name": "attempt_ok", "value": str(ok), "type": "internal_attempt_status", "tags": tags})
    if exception:
        data.append({"field_name": "exception", "value": json.dumps(exception), "type": "exception", "tags": tags})
    assert client.post(path, json=data).json() == {"metadata_created": len(data)}


def test_ping_carries_the_version_and_capabilities(client: TestClient) -> None:
    answer = client.get("/ping")
    assert answer.text == "pong"
    assert answer.headers["METADATA_SERVICE_VERSION"] == SERVICE_VERSION
    assert answer.headers["X-Capabilities"].split(",") == list(CAPABILITIES)


def test_objects_have_the_reference_shapes_and_run_tags(client: TestClient) -> None:
    run = new_run(client, tags=["team:a"])
    assert set(run) == RUN_KEYS and isinstance(run["run_number"], int)
    assert run["last_heartbeat_ts"] is not None  # a heartbeat-capable client version
    task = new_task(client, "F", run["run_number"], "start")
    assert set(task) == TASK_KEYS
    assert task["tags"] == ["team:a"] and task["system_tags"] == SYSTEM_TAGS
    named = new_run(client, run_number="argo-xyz")
    assert named["run_number"] == "argo-xyz"
    step = client.get("/flows/F/runs/argo-xyz/steps").json()
    assert step == []
    named_task = new_task(client, "F", "argo-xyz", "start", task_id="t-1")
    assert named_task["task_id"] == "t-1" and named_task["run_number"] == "argo-xyz"
    assert client.get("/flows/F/runs/argo-xyz/steps/start/tasks/t-1").json() == named_task
    listed = client.get("/flows/F/runs").json()
    assert [r["run_number"] for r in listed] == [run["run_number"], "argo-xyz"]


def test_creation_conflicts_and_missing_parents(client: TestClient) -> None:
    new_run(client)
    assert client.post("/flows/F", json={}).status_code == 409
    assert client.post("/flows/G/run", json={}).status_code == 404
    assert client.post("/flows/F/runs/99/steps/s/step", json={}).status_code == 404
    run = new_run(client, run_number="named")
    assert client.post("/flows/F/run", json={"run_number": "named"}).status_code == 409
    no_step = client.post(f"/flows/F/runs/{run['run_number']}/steps/nostep/task", json={})
    assert no_step.status_code == 404
    assert client.get("/flows/F/runs/12345").status_code == 404
    assert client.get("/flows/F/runs/12345/steps").json() == []  # as the reference service answers


def _cursor_of(content: bytes) -> str:
    return base64.urlsafe_b64encode(content).decode().rstrip("=")


@pytest.mark.parametrize(
    ("method", "path", "body", "parameter"),
    [
        ("post", "/flows/F/run", {"run_number": "123"}, "run_number"),
        ("post", "/flows/F/run", {"tags": "not-a-list"}, "tags"),
        ("get", "/flows/F/runs/" + "x" * 300, None, "run_number"),
        ("get", "/flows/F/runs?_limit=0", None, "_limit"),
        ("get", "/flows/F/runs?_limit=many", None, "_limit"),
        ("get", "/flows/F/runs?_cursor=%%%", None, "_cursor"),
        ("get", "/flows/F/runs?colour:eq=red", None, "colour:eq"),
        ("get", "/flows/F/runs?status:eq=sleeping", None, "status:eq"),
        ("get", "/flows/F/runs?ts_epoch:ge=yesterday", None, "ts_epoch:ge"),
        ("get", "/flows/F/runs/1/steps/start/filtered_tasks?pattern=(", None, "pattern"),
        ("get", "/flows/F/runs/1/steps/start/tasks/1/artifacts/a/attempt/x", None, "attempt"),
        ("patch", "/flows/F/runs/1/tag/mutate", {"tags_to_add": "x"}, "tags_to_add"),
        ("get", "/events?since=abc", None, "since"),
        ("post", "/flows/F", {"user_name": {"a": 1}}, "user_name"),
        ("post", "/flows/a..b", {}, "flow_id"),
        ("post", "/flows/F/runs/1/steps/not a step/step", {}, "step_name"),
        ("post", "/flows/F/runs/1/steps/start/task", {"task_id": ["x"]}, "task_id"),
        ("post", "/flows/F/runs/1/steps/start/tasks/1/metadata", {"field_name": "x"}, "body"),
        ("post", "/flows/F/runs/1/steps/start/tasks/1/metadata", [{"field_name": "x" * 300}], "0.field_name"),
        ("post", "/flows/F/runs/1/steps/start/tasks/1/artifact", [{"name": "a", "size": -1}], "0.size"),
        ("post", "/flows/F/runs/1/steps/start/tasks/1/artifact", [{"name": "a", "location": {}}], "0.location"),
        ("post", "/flows/F/runs/1/heartbeat", {"ended": "soon"}, "ended"),
        # Within the body limit, yet what no Metaflow client sends: each cost memory or every later read.
        ("post", "/flows/F/run", {"tags": ["t"] * 1001}, "tags"),
        ("post", "/flows/F/run", {"system_tags": ["t" * 1025]}, "system_tags.0"),
        ("patch", "/flows/F/runs/1/tag/mutate", {"tags_to_add": [str(n) for n in range(1001)]}, "tags_to_add"),
        ("post", "/flows/F/runs/1/steps/start/tasks/1/metadata", [{"field_name": "x"}] * 10_001, "body"),
        ("post", "/flows/F/runs/1/steps/start/tasks/1/metadata", [{"value": "v" * (1 << 20) + "v"}], "0.value"),
        ("post", "/flows/F/runs/1/steps/start/tasks/1/artifact", [{"name": "a"}] * 10_001, "body"),
        ("post", "/flows/F/runs/1/steps/start/tasks/1/artifact", [{"name": "a", "location": "s" * 4097}], "0.location"),
        # Query parameters that were 500s (or a 503 saying the database was away) until each was checked.
        ("get", f"/flows/F/runs?_cursor={_cursor_of(b'[' * 1000)}", None, "_cursor"),
        ("get", f"/flows/F/runs?_cursor={_cursor_of(b'[99999999999999999999999,1]')}", None, "_cursor"),
        ("get", f"/flows/F/runs?_cursor={'A' * 4097}", None, "_cursor"),
        ("get", "/flows/F/runs?ts_epoch:ge=--5", None, "ts_epoch:ge"),
        ("get", "/flows/F/runs?ts_epoch:ge=99999999999999999999999", None, "ts_epoch:ge"),
        ("get", "/flows/F/runs?_tags:all=" + ",".join(f"t{n}" for n in range(101)), None, "_tags:all"),
        ("get", "/flows/F/runs/abc%0A", None, "run_number"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(
    client: TestClient, method: str, path: str, body: dict | None, parameter: str
) -> None:
    run = new_run(client)
    new_task(client, "F", run["run_number"], "start")
    answer = client.request(method.upper(), path, json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["details"]["parameter"] == parameter
    assert parameter in answer.json()["message"]


def test_malformed_json_unknown_routes_and_methods(client: TestClient) -> None:
    new_run(client)
    malformed = client.post("/flows/F/run", content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["code"] == "bad_parameter"
    missing = client.get("/no/such/route")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert client.delete("/flows/F").status_code == 405


@pytest.mark.parametrize(
    "path",
    [
        "/flows/F/runs/\u00b9",  # superscript one: str.isdigit takes it, int refuses it (found by schemathesis)
        "/flows/F/runs/\u00b9/steps/start/filtered_tasks?pattern=a",
        "/flows/F/runs/1/steps/start/tasks/\u00b2",
        "/flows/F/runs?_limit=\u00b3",
    ],
)
def test_unicode_digits_are_ids_or_refusals_never_a_500(client: TestClient, path: str) -> None:
    new_run(client)
    answer = client.get(path)
    assert answer.status_code in (200, 400, 404), answer.text
    assert answer.headers["content-type"].startswith("application/json")


def test_oversize_bodies_are_refused_with_413(tmp_path: Path) -> None:
    config = ServiceConfig(database_url=str(tmp_path / "m.db"), max_body_bytes=1024)
    with TestClient(create_app(config), base_url=LOOPBACK) as client:
        answer = client.post("/flows/F", json={"flow_id": "F", "tags": ["x" * 2000]})
        assert answer.status_code == 413 and answer.json()["code"] == "payload_too_large"
        assert client.get("/flows/F").status_code == 404  # nothing was written


def test_auth_key_guards_everything_but_the_health_check(tmp_path: Path) -> None:
    config = ServiceConfig(database_url=str(tmp_path / "m.db"), auth_key="s3cret")
    with TestClient(create_app(config), base_url=LOOPBACK) as client:
        assert client.get("/healthcheck").status_code == 200
        assert client.get("/ping").status_code == 401
        wrong = client.get("/flows", headers={"x-api-key": "guess"})
        assert wrong.status_code == 401 and wrong.json()["code"] == "unauthorized"
        assert client.get("/flows", headers={"x-api-key": "s3cret"}).status_code == 200


def test_an_unreachable_database_is_a_503_to_retry(tmp_path: Path) -> None:
    from conftest import free_port

    url = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    with TestClient(create_app(ServiceConfig(database_url=url, migrate=False)), base_url=LOOPBACK) as client:
        answer = client.post("/flows/F", json={})
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        assert answer.json()["code"] == "database_unavailable"


def test_runs_page_newest_first_and_filter_on_the_server(client: TestClient) -> None:
    made = [
        new_run(client, tags=["even"] if i % 2 == 0 else ["odd"], user="ana" if i < 60 else "bo") for i in range(120)
    ]
    seen, cursor, pages = [], None, 0
    while True:
        answer = client.get("/flows/F/runs", params={"_limit": 50, **({"_cursor": cursor} if cursor else {})})
        assert answer.headers["X-Limit"] == "50"
        seen += [r["run_number"] for r in answer.json()]
        pages += 1
        cursor = answer.headers.get("X-Next-Cursor")
        if not cursor:
            break
    assert pages == 3
    assert seen == [r["run_number"] for r in reversed(made)]
    tagged = client.get("/flows/F/runs", params={"_tags:all": "even", "user:eq": "bo", "_limit": 1000}).json()
    assert sorted(r["run_number"] for r in tagged) == [
        r["run_number"] for i, r in enumerate(made) if i % 2 == 0 and i >= 60
    ]
    system = client.get("/flows/F/runs", params={"_tags:any": "user:ana,nothing"}).json()
    assert len(system) == 50  # every run has the system tag; one page
    window = client.get(
        "/flows/F/runs",
        params={"ts_epoch:ge": made[10]["ts_epoch"], "ts_epoch:le": made[19]["ts_epoch"], "_limit": 1000},
    ).json()
    assert {r["run_number"] for r in window} >= {r["run_number"] for r in made[10:20]}
    assert all(r["status"] == "running" for r in window)


def test_stored_values_no_reader_can_parse_do_not_break_a_runs_reads(client: TestClient) -> None:
    """Any client may store values: one nested past the parser's limit made every read of its run a 500,
    and a MiB of foreach stack cost 500 MB and seconds per read."""
    number = new_run(client)["run_number"]
    deep, flat = new_task(client, "F", number, "fan"), new_task(client, "F", number, "fan")
    attempt(client, deep, 0, False)
    path = "/flows/F/runs/{}/steps/fan/tasks/{}/metadata"
    nested = "[" * 5000 + "]" * 5000
    written = client.post(
        path.format(number, deep["task_id"]),
        json=[
            {"field_name": "foreach-stack", "value": "[" + "-" * 5000 + "1]", "type": "foreach-stack"},
            {"field_name": "confidential-verification", "value": '{"a":' + nested + "}", "type": "x"},
            {"field_name": "exception", "value": nested, "type": "exception", "tags": ["attempt_id:0"]},
        ],
    )
    assert written.status_code == 200, written.text
    flat_stack = {"field_name": "foreach-stack", "value": "[" + "0," * 500_000 + "]", "type": "foreach-stack"}
    assert client.post(path.format(number, flat["task_id"]), json=[flat_stack]).status_code == 200
    tasks = client.get(f"/flows/F/runs/{number}/tasks")
    assert tasks.status_code == 200 and [t["foreach"] for t in tasks.json()] == [[], []], tasks.text[:500]
    assert client.get(f"/flows/F/runs/{number}/summary").status_code == 200
    (failure,) = client.get(f"/flows/F/runs/{number}/failures").json()
    assert failure["exception"] == {"type": None, "message": nested[:MESSAGE_CHARS], "traceback": []}


def _metadata_path(task: dict) -> str:
    return f"/flows/F/runs/{task['run_number']}/steps/{task['step_name']}/tasks/{task['task_id']}/metadata"


def test_a_verification_the_step_posted_beside_its_launchers_is_conflicting_never_attested(
    client: TestClient,
) -> None:
    """The launcher records one verification per attempt before the step's code runs; the step may POST
    metadata too, and its record, the newest, was shown as "attested". Unsigned, neither is shown then."""
    number = new_run(client)["run_number"]
    task = new_task(client, "F", number, "score")
    attempt(client, task, 0, None)

    def record(value: dict, attempt_id: int) -> None:
        datum = {"field_name": "confidential-verification", "value": json.dumps(value),
                 "type": "confidential-verification", "tags": [f"attempt_id:{attempt_id}"]}  # fmt: skip
        assert client.post(_metadata_path(task), json=[datum]).status_code == 200

    record({"attested": False, "mode": "direct"}, 0)
    record({"attested": True, "mode": "sgx", "policy": "prod"}, 3)  # another attempt's: not this one's
    (alone,) = client.get(f"/flows/F/runs/{number}/tasks").json()
    assert alone["confidential"] == {"attested": False, "mode": "direct"}
    record({"attested": True, "mode": "sgx", "policy": "prod"}, 0)
    (shown,) = client.get(f"/flows/F/runs/{number}/tasks").json()
    assert shown["confidential"]["conflicting"] is True and shown["confidential"]["attested"] is False
    assert "policy" not in shown["confidential"]


def test_foreach_items_are_bounded_and_a_long_stack_is_not_parsed(client: TestClient) -> None:
    """A stack is what led to the task (Metaflow records 256 characters of it); a client may store a 64 KiB
    literal of 32,000 items, each parsed and sent on every read of the run's tasks."""
    number = new_run(client)["run_number"]
    many, long, escaped, huge = (new_task(client, "F", number, "fan") for _ in range(4))
    stacks = {
        many["task_id"]: str([f"i={n}" for n in range(40)]),
        long["task_id"]: str(["i=" + "x" * 400]),
        escaped["task_id"]: str(["i=" + "\U000e0001" * 200]),  # (as Metaflow may write it: 2 KiB as a repr)
        huge["task_id"]: "[" + "0," * 32_000 + "]",
    }
    for task in (many, long, escaped, huge):
        datum = {"field_name": "foreach-stack", "value": stacks[task["task_id"]], "type": "foreach-stack"}
        assert client.post(_metadata_path(task), json=[datum]).status_code == 200
    shown = {t["task_id"]: t["foreach"] for t in client.get(f"/flows/F/runs/{number}/tasks").json()}
    assert shown[many["task_id"]] == [f"i={n}" for n in range(FOREACH_ITEMS)]
    assert shown[long["task_id"]] == [("i=" + "x" * 400)[:FOREACH_CHARS]]
    assert shown[escaped["task_id"]] == [("i=" + "\U000e0001" * 200)[:FOREACH_CHARS]]
    assert shown[huge["task_id"]] == []


def test_a_recorded_exception_of_another_shape_reads_as_a_note_not_as_recorded(client: TestClient) -> None:
    """Any client may record a task's exception: a JSON list went out as the exception, and a reader that
    took it for an object raised for the whole run."""
    number = new_run(client)["run_number"]
    task = new_task(client, "F", number, "fan")
    attempt(client, task, 0, False)
    datum = {"field_name": "exception", "value": "[1, 2]", "type": "exception", "tags": ["attempt_id:0"]}
    assert client.post(_metadata_path(task), json=[datum]).status_code == 200
    (failure,) = client.get(f"/flows/F/runs/{number}/failures").json()
    assert failure["exception"]["type"] is None and failure["exception"]["traceback"] == []
    assert "a JSON list" in failure["exception"]["message"]


def test_status_summary_failures_and_run_tasks(client: TestClient) -> None:
    run = new_run(client)
    number = run["run_number"]
    new_task(client, "F", number, "_parameters")  # Metaflow's internal step: never in a summary
    start = new_task(client, "F", number, "start")
    attempt(client, start, 0, True)
    work = [new_task(client, "F", number, "fan") for _ in range(4)]
    attempt(client, work[0], 0, True)
    attempt(client, work[1], 0, False, {"type": "RuntimeError", "message": "flaky"})
    attempt(client, work[1], 1, True)  # retried, then fine
    attempt(client, work[2], 0, False, {"type": "ValueError", "message": "bad item"})
    attempt(client, work[3], 0, None)  # still running
    summary = client.get(f"/flows/F/runs/{number}/summary").json()
    assert summary["status"] == "running"
    steps = {s["step_name"]: s for s in summary["steps"]}
    assert list(steps) == ["start", "fan"]
    assert steps["fan"] == {"step_name": "fan", "total": 4, "completed": 2, "failed": 1, "running": 1, "killed": 0}
    assert summary["first_failure"]["task_id"] == work[2]["task_id"]
    assert summary["first_failure"]["exception"] == {"type": "ValueError", "message": "bad item", "traceback": []}
    failures = client.get(f"/flows/F/runs/{number}/failures").json()
    assert [(f["task_id"], f["attempt"]) for f in failures] == [(work[2]["task_id"], 0)]
    failed = client.get(f"/flows/F/runs/{number}/tasks", params={"status:eq": "failed"}).json()
    assert [t["task_id"] for t in failed] == [work[2]["task_id"]]
    step_page = client.get(f"/flows/F/runs/{number}/steps/fan/tasks", params={"status:eq": "completed"}).json()
    assert [t["task_id"] for t in step_page] == [work[0]["task_id"], work[1]["task_id"]]
    # The runtime exits (this project's client says so): with a failed task the run has failed.
    assert client.post(f"/flows/F/runs/{number}/heartbeat", json={"ended": True}).json() == {"wait_time_in_seconds": 10}
    assert client.get(f"/flows/F/runs/{number}/summary").json()["status"] == "failed"
    assert client.get("/flows/F/runs", params={"status:eq": "failed"}).json()[0]["run_number"] == number
    ok = new_run(client)
    end = new_task(client, "F", ok["run_number"], "end")
    attempt(client, end, 0, True)
    assert client.get("/flows/F/runs", params={"status:eq": "completed"}).json()[0]["run_number"] == ok["run_number"]


def test_artifacts_latest_attempt_by_attempt_and_searched(client: TestClient) -> None:
    run = new_run(client)
    task = new_task(client, "F", run["run_number"], "fan")
    path = f"/flows/F/runs/{run['run_number']}/steps/fan/tasks/{task['task_id']}"

    def art(name: str, attempt_id: int, size: int | None = None, python_type: str | None = None) -> dict:
        return {
            "name": name,
            "attempt_id": attempt_id,
            "location": "/x",
            "ds_type": "local",
            "sha": name,
            "type": "metaflow.artifact",
            "content_type": "pickle-v4",
            "size": size,
            "python_type": python_type,
        }

    made = client.post(f"{path}/artifact", json=[art("name", 0), art("model", 0, 10, "dict"), art("name", 0)])
    assert made.json() == {"artifacts_created": 2}  # the duplicate is ignored
    client.post(f"{path}/artifact", json=[art("name", 1), art("model", 1, 5_000_000, "sklearn.svm.SVC")])
    latest = client.get(f"{path}/artifacts").json()
    assert {(a["name"], a["attempt_id"]) for a in latest} == {("name", 1), ("model", 1)}
    assert {(a["name"], a["attempt_id"]) for a in client.get(f"{path}/attempt/0/artifacts").json()} == {
        ("name", 0),
        ("model", 0),
    }
    assert client.get(f"{path}/artifacts/model").json()["attempt_id"] == 1
    assert client.get(f"{path}/artifacts/model/attempt/0").json()["sha"] == "model"
    assert client.get(f"{path}/artifacts/nothing").status_code == 404
    big = client.get(f"/flows/F/runs/{run['run_number']}/artifacts", params={"size:ge": 1_000_000}).json()
    assert [(a["name"], a["python_type"]) for a in big] == [("model", "sklearn.svm.SVC")]
    across = client.get("/flows/F/artifacts", params={"name:co": "mod", "type:eq": "sklearn.svm.SVC"}).json()
    assert [a["size"] for a in across] == [5_000_000]


def test_tag_mutation_rules(client: TestClient) -> None:
    run = new_run(client, tags=["a"])
    path = f"/flows/F/runs/{run['run_number']}/tag/mutate"
    assert client.patch(path, json={"tags_to_add": ["b"], "tags_to_remove": ["a"]}).json() == {"tags": ["b"]}
    refused = client.patch(path, json={"tags_to_remove": ["runtime:dev"]})
    assert refused.status_code == 422
    assert client.patch(path, json={"tags_to_add": ["runtime:dev"]}).json() == {
        "tags": ["b"]
    }  # system tags stay system
    task = new_task(client, "F", run["run_number"], "start")
    assert client.get(f"/flows/F/runs/{run['run_number']}/steps/start/tasks/{task['task_id']}").json()["tags"] == ["b"]


def test_filtered_tasks_match_metadata_values(client: TestClient) -> None:
    run = new_run(client)
    tasks = [new_task(client, "F", run["run_number"], "fan") for _ in range(3)]
    for i, task in enumerate(tasks):
        path = f"/flows/F/runs/{run['run_number']}/steps/fan/tasks/{task['task_id']}/metadata"
        client.post(path, json=[{"field_name": "foreach-index", "value": str(i), "type": "x", "tags": []}])
    found = client.get(
        f"/flows/F/runs/{run['run_number']}/steps/fan/filtered_tasks",
        params={"metadata_field_name": "foreach-index", "pattern": "^(?:[02])$"},
    ).json()
    assert found == [
        f"F/{run['run_number']}/fan/{tasks[0]['task_id']}",
        f"F/{run['run_number']}/fan/{tasks[2]['task_id']}",
    ]


def test_a_run_whose_heartbeat_stops_is_killed_after_the_cutoff(tmp_path: Path) -> None:
    import time

    later = [0.0]  # seconds the service's clock runs ahead of the writes' clock
    config = ServiceConfig(
        database_url=str(tmp_path / "m.db"), heartbeat_cutoff_s=5, clock=lambda: time.time() + later[0]
    )
    with TestClient(create_app(config), base_url=LOOPBACK) as client:
        run = new_run(client)
        task = new_task(client, "F", run["run_number"], "fan")
        attempt(client, task, 0, None)
        assert client.get(f"/flows/F/runs/{run['run_number']}/summary").json()["status"] == "running"
        later[0] = 6.0  # no heartbeat since, as after `kill -9` of the runtime
        summary = client.get(f"/flows/F/runs/{run['run_number']}/summary").json()
        assert summary["status"] == "killed"
        assert {s["step_name"]: s["killed"] for s in summary["steps"]}["fan"] == 1
        assert client.get("/flows/F/runs", params={"status:eq": "killed"}).json()[0]["run_number"] == run["run_number"]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(service_factory, tmp_path: Path) -> None:
    service = service_factory()
    # Objects to find, so operations get past their 404s: a flow, a run, a step and a task with an attempt.
    client = httpx.Client(base_url=service.url)
    client.post("/flows/F", json={})
    run = client.post("/flows/F/run", json={"system_tags": SYSTEM_TAGS}).json()["run_number"]
    client.post(f"/flows/F/runs/{run}/steps/start/step", json={})
    task = client.post(f"/flows/F/runs/{run}/steps/start/task", json={}).json()["task_id"]
    metadata = [{"field_name": "attempt", "value": "0", "type": "attempt", "tags": ["attempt_id:0"]}]
    client.post(f"/flows/F/runs/{run}/steps/start/tasks/{task}/metadata", json=metadata)
    report = fuzz_finds_nothing(service.url, tmp_path, exclude=("/events",))
    assert int(re.search(r"Tested: (\d+)", report)[1]) >= 30  # every operation but the stream
