"""``@nomad``'s offline parts: a task attempt rendered as Nomad's job JSON (checked against the fields
of Nomad's API structs, ``tests/nomad_double/job.schema.json``), and the log endpoint's frames decoded
however the body is cut."""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from metaflow_stack.engines.nomad import jobspec
from metaflow_stack.engines.nomad.jobspec import Placement, constraints_of, job_id, task_job, workers_job
from metaflow_stack.engines.nomad.logs import MAX_LINE, MAX_PENDING, FrameDecoder, Lines
from metaflow_stack.errors import StackError

SCHEMA = json.loads((Path(__file__).resolve().parent / "nomad_double" / "job.schema.json").read_text())
COMMAND = ["sh", "-c", "python flow.py step train"]
META = {"metaflow.flow": "TrainFlow", "metaflow.run_id": "12", "metaflow.step": "train"}


def registered(job: dict) -> dict:
    """``job`` as the body of ``PUT /v1/jobs``, checked against Nomad's fields."""
    body = {"Job": job}
    jsonschema.validate(body, SCHEMA)
    return job


def test_a_task_is_a_batch_job_nomad_never_restarts_or_reschedules() -> None:
    job = registered(task_job("mf-j", COMMAND, {"A": "1"}, Placement(image="r/base:t"), META))
    (group,) = job["TaskGroups"]
    assert job["Type"] == "batch" and job["ID"] == job["Name"] == "mf-j" and job["Meta"] == META
    assert group["RestartPolicy"] == {"Attempts": 0, "Mode": "fail"}
    assert group["ReschedulePolicy"] == {"Attempts": 0, "Unlimited": False}
    (task,) = group["Tasks"]
    assert task["Driver"] == "docker" and task["Env"] == {"A": "1"}
    assert task["Config"] == {"image": "r/base:t", "entrypoint": ["sh"], "args": ["-c", "python flow.py step train"]}
    assert task["Resources"] == {"MemoryMB": 4096, "Cores": 1}
    assert task["KillTimeout"] == 30 * 10**9
    assert not {"Datacenters", "Namespace", "Region", "NodePool", "Constraints"} & set(job)


def test_a_shells_braces_reach_the_task_as_written_not_as_nomads_templates() -> None:
    """Nomad reads every string of a task's config as an HCL template: ``${X:-y}`` would fail its
    validation, ``%{`` start a directive. Both are escaped, so the shell gets what was written."""
    script = 'cd "${NOMAD_TASK_DIR:-/tmp}" && printf "%{x}"'
    job = registered(task_job("mf-j", ["sh", "-c", script], {}, Placement(image="r/base:t"), META))
    config = job["TaskGroups"][0]["Tasks"][0]["Config"]
    assert config["args"] == ["-c", 'cd "$${NOMAD_TASK_DIR:-/tmp}" && printf "%%{x}"']


def test_a_pools_workers_are_a_service_job_of_count_allocations_stopped_by_sigterm() -> None:
    """Nomad keeps a pool's workers running (a service job, its restart defaults) and stops them with the
    signal they stop on, not exec's and raw_exec's default SIGINT, which a worker ignores; each holds its
    workload identity."""
    placement = Placement(cpu=2, memory=1024, driver="raw_exec", namespace="ml")
    job = registered(workers_job("mf-pool-each-1", COMMAND, {"A": "1"}, placement, {"k": "v"}, 3))
    (group,) = job["TaskGroups"]
    assert job["Type"] == "service" and job["Namespace"] == "ml" and group["Count"] == 3
    assert "RestartPolicy" not in group and "ReschedulePolicy" not in group
    (task,) = group["Tasks"]
    assert task["KillSignal"] == "SIGTERM" and task["Driver"] == "raw_exec" and task["Env"] == {"A": "1"}
    assert task["Identity"] == {"Env": True}  # (it reads its job's variable with it)
    assert task["Config"] == {"command": "sh", "args": ["-c", "python flow.py step train"]}
    assert task["Resources"] == {"MemoryMB": 1024, "Cores": 2}


def test_resources_gpus_and_placement_in_nomad_terms() -> None:
    placement = Placement(
        cpu=0.5,
        memory=2048,
        gpu=2,
        gpu_model="H100",
        gpu_memory=40000,
        image="r/base:t",
        datacenters=("dc1", "dc2"),
        namespace="ml",
        region="eu",
        node_pool="gpus",
        constraints=constraints_of([{"attribute": "${attr.kernel.name}", "value": "linux"}]),
    )
    job = registered(task_job("mf-j", COMMAND, {}, placement, META))
    resources = job["TaskGroups"][0]["Tasks"][0]["Resources"]
    assert resources["CPU"] == 500 and "Cores" not in resources and resources["MemoryMB"] == 2048
    assert resources["Devices"] == [
        {
            "Name": "nvidia/gpu",
            "Count": 2,
            "Constraints": [
                {"LTarget": "${device.model}", "RTarget": "H100", "Operand": "="},
                {"LTarget": "${device.attr.memory}", "RTarget": "40000 MiB", "Operand": ">="},
            ],
        }
    ]
    assert job["Datacenters"] == ["dc1", "dc2"] and job["Namespace"] == "ml" and job["Region"] == "eu"
    assert job["NodePool"] == "gpus"
    assert job["Constraints"] == [{"LTarget": "${attr.kernel.name}", "RTarget": "linux", "Operand": "="}]


@pytest.mark.parametrize("driver", ["exec", "raw_exec"])
def test_exec_drivers_run_the_command_with_no_image(driver: str) -> None:
    job = registered(task_job("mf-j", COMMAND, {}, Placement(driver=driver, cpu=3), META))
    task = job["TaskGroups"][0]["Tasks"][0]
    assert task["Driver"] == driver and task["Config"] == {"command": "sh", "args": COMMAND[1:]}
    assert task["Resources"]["Cores"] == 3


def test_job_ids_name_the_attempt_within_nomads_limit() -> None:
    assert job_id("TrainFlow", "1733", "train", "4", 1) == "mf-trainflow-1733-train-4-1"
    assert job_id("F", "argo-x y", "s", "t", 0) == "mf-f-argo-x-y-s-t-0"
    long = [job_id("F" * 200, "1", "s", str(task), 0) for task in range(2)]
    assert all(len(name) == jobspec.MAX_JOB_ID for name in long) and long[0] != long[1]
    for name in long:
        registered(task_job(name, COMMAND, {}, Placement(image="i:t"), META))


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"driver": "podman", "image": "i:t"}, "driver='podman' is not one of"),
        ({"cpu": 0, "image": "i:t"}, "must be positive"),
        ({"gpu": -1, "image": "i:t"}, "must be positive"),
        ({"image": "i:t", "constraints": (("${attr.a}", "~", "b"),)}, "'~', which Nomad does not know"),
    ],
)
def test_bad_placements_are_refused_naming_the_fix(settings: dict, words: str) -> None:
    with pytest.raises(StackError) as caught:
        Placement(**settings)
    assert words in caught.value.message and caught.value.fix


def test_a_docker_job_needs_its_image() -> None:
    with pytest.raises(StackError, match="the docker driver needs an image"):
        task_job("mf-j", COMMAND, {}, Placement(), META)


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ("linux", "is not a list of constraints"),
        ([{"value": "linux"}], "needs an attribute"),
        ([{"attribute": "a", "op": "="}], "not op"),
    ],
)
def test_constraints_as_users_write_them_are_checked(given: object, words: str) -> None:
    with pytest.raises(StackError) as caught:
        constraints_of(given)
    assert words in caught.value.message
    assert constraints_of([{"attribute": "a", "operator": ">=", "value": "2"}]) == (("a", ">=", "2"),)
    every = [{"attribute": "${meta.tags}", "operator": "set_contains_all", "value": "ssd,gpu"}]
    assert constraints_of(every) == (("${meta.tags}", "set_contains_all", "ssd,gpu"),)
    assert constraints_of(None) == ()


def frame(data: bytes = b"", **fields: object) -> bytes:
    body = {**({"Data": base64.b64encode(data).decode()} if data else {}), **fields}
    return json.dumps(body).encode() + b"\n"


def test_frames_are_decoded_however_the_body_is_cut() -> None:
    body = frame(b"line one\nline t", Offset=15, File="alloc/logs/metaflow.stdout.0") + b"{}\n"
    body += frame(b"wo\n", Offset=18, File="alloc/logs/metaflow.stdout.0") + frame(FileEvent="file truncated")
    whole = FrameDecoder().feed(body)
    for cut in range(1, len(body)):
        decoder = FrameDecoder()
        assert decoder.feed(body[:cut]) + decoder.feed(body[cut:]) == whole
    assert [f.heartbeat for f in whole] == [False, True, False, False]
    assert whole[0].data == b"line one\nline t" and whole[0].offset == 15 and whole[3].event == "file truncated"
    lines = Lines()
    assert [line for f in whole for line in lines.feed(f.data)] == ["line one", "line two"]
    assert lines.flush() == []


def test_what_is_not_nomads_frames_is_an_error_not_a_hang() -> None:
    with pytest.raises(ValueError, match="not base64"):
        FrameDecoder().feed(b'{"Data": "***"}')
    with pytest.raises(ValueError, match="JSON object"):
        FrameDecoder().feed(b"[1, 2]")
    decoder = FrameDecoder()
    decoder.feed(b'{"Data": "' + b"A" * (MAX_PENDING - 20))  # not whole yet: held
    with pytest.raises(ValueError, match="no whole log frame"):
        decoder.feed(b"A" * 100)


def test_a_log_with_no_newline_comes_out_in_bounded_pieces() -> None:
    lines = Lines()
    out = lines.feed(b"x" * (MAX_LINE * 2 + 5))
    assert [len(line) for line in out] == [MAX_LINE, MAX_LINE] and lines.flush() == ["xxxxx"]


def test_a_deployed_flow_is_a_parameterized_job_or_with_a_schedule_a_periodic_one() -> None:
    from metaflow_stack.nomad.deployment import DEPLOYED, deployed_job, deployment_name

    name = deployment_name("Train_Flow")
    assert name == "metaflow-train-flow"
    placement = Placement(image="r/base:t")
    params = (["alpha"], ["greeting-word"])
    dispatched = registered(deployed_job(name, "Train_Flow", COMMAND, {}, placement, params, None, {"a": "b"}))
    assert dispatched["ParameterizedJob"] == {
        "Payload": "forbidden",
        "MetaRequired": ["alpha"],
        "MetaOptional": ["greeting-word"],
    }
    assert "Periodic" not in dispatched and dispatched["Meta"][DEPLOYED] == "true" and dispatched["Meta"]["a"] == "b"
    assert dispatched["TaskGroups"][0]["RestartPolicy"]["Attempts"] == 0  # retries are the flow's @retry
    daily = registered(deployed_job(name, "Train_Flow", COMMAND, {}, placement, ([], []), ("0 0 * * ? *", "UTC"), {}))
    assert daily["Periodic"] == {
        "Enabled": True,
        "SpecType": "cron",
        "Spec": "0 0 * * ? *",  # (Nomad's cron takes AWS's six fields)
        "ProhibitOverlap": True,
        "TimeZone": "UTC",
    }
    assert "ParameterizedJob" not in daily


def test_a_dispatch_gives_the_run_its_parameters_as_nomad_names_them() -> None:
    from metaflow_stack.nomad.dispatched import run_line

    env = {"NOMAD_JOB_ID": "metaflow-f/dispatch-1-ab", "NOMAD_META_alpha": "3", "NOMAD_META_GREETING_WORD": "hi"}
    env["NOMAD_META_unset"] = ""  # (Nomad sets every optional key a dispatch did not give, empty)
    line = run_line("flow.py", ["--metadata", "service"], ["alpha", "greeting-word", "unset"], env, Path("/r"))
    assert line[2:] == [
        "flow.py",
        "--metadata",
        "service",
        "run",
        "--run-id-file",
        "/r",
        "--tag",
        "nomad-job:metaflow-f/dispatch-1-ab",
        "--alpha",
        "3",
        "--greeting-word",
        "hi",
    ]


def test_the_run_id_is_read_whole_wherever_it_lands_in_the_runs_own_output() -> None:
    """The marker is one write, but Metaflow's logger writes a line's timestamp, task and message apart: it
    can land after a timestamp (as it did once in CI, where the trigger then never saw it). It starts a line
    of its own; a task's output that merely contains it says nothing."""
    from metaflow_stack.engines.nomad.logs import Lines
    from metaflow_stack.nomad.deployment import RUN_ID_MARKER, marker_line, run_id_in

    stream = b"2026-12-05 19:07:55.345 " + marker_line("12") + b"[1/start/1 (pid 7)] Task is starting.\n"
    stream += f"2026-12-05 19:07:56.001 [1/start/1 (pid 7)] {RUN_ID_MARKER}99\n".encode()  # (printed by the task)
    for cut in range(len(stream)):  # however Nomad's frames cut it
        lines = Lines()
        said = [*lines.feed(stream[:cut]), *lines.feed(stream[cut:]), *lines.flush()]
        assert [run_id for line in said if (run_id := run_id_in(line))] == ["12"]
    assert run_id_in(RUN_ID_MARKER) is None


def test_a_deployed_jobs_credentials_are_exported_quoted_and_only_under_variable_names() -> None:
    from metaflow_stack.nomad.job_secrets import exports

    said = exports({"B": "it's $(rm -rf /)", "A_1": "plain"}, "deploy again")
    assert said == "export A_1=plain\nexport B='it'\"'\"'s $(rm -rf /)'\n"
    line = ["bash", "-c", 'eval "$EXPORTS" && printf %s "$B"']  # (as the job's shell takes them)
    done = subprocess.run(line, env={"EXPORTS": said, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert done.stdout == "it's $(rm -rf /)"
    with pytest.raises(StackError):
        exports({"X; rm -rf /": "1"}, "deploy again")


def test_the_credentials_reader_runs_on_the_standard_library_alone() -> None:
    """It runs first in every job that keeps credentials in its variable, with the image's Python (a user's
    image, an exec or raw_exec client's: Metaflow's needs only; the runtime itself comes in the code
    package), so it may import nothing else."""
    others = "{'httpx', 'metaflow', 'redis', 'click', 'rich', 'pydantic'}"
    code = f"import sys, metaflow_stack.nomad.job_secrets; print(sorted(set(sys.modules) & {others}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_deployed_jobs_name_must_also_name_its_variable() -> None:
    from metaflow_stack.nomad.deployment import check_name, deployment_name

    assert check_name(deployment_name("My.Flow_2")) == "metaflow-my-flow-2"
    for wrong in ("my.flow", "a/b", "", "x" * 118):
        with pytest.raises(StackError) as refused:
            check_name(wrong)
        assert "letters, digits" in refused.value.fix


#: Values a user may give a run (a tag, an environment variable): quotes, a backslash, what a shell would run.
AWKWARD = ["bob's run", 'a\\"b', "x'$(touch pwned)'y", 'say "hi"']


def _split_by_bash(script: str, command: str, cwd: Path) -> list[str]:
    """The words bash makes of ``command`` where ``script`` (the job's ``bash -c`` script) holds it, and
    nothing it ran."""
    assert command in script  # (the line as the shell reads it: what bash runs in the job)
    done = subprocess.run(["bash", "-c", f"printf '%s\\n' {command}"], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0 and not list(cwd.iterdir()), done.stderr
    return done.stdout.splitlines()


def test_values_with_quotes_reach_a_task_elsewhere_as_they_are(tmp_path: Path) -> None:
    """A task's command elsewhere (``@nomad``, Phala) and a deployed flow's job go through ``bash -c "..."``,
    which Metaflow's commands are written for: a value whose shell quoting held a ``"`` (any ``'``) closed
    those quotes, and the task failed to start or ran part of the value as shell."""
    from metaflow import util
    from metaflow.metaflow_environment import MetaflowEnvironment

    from metaflow_stack.elsewhere import task_command
    from metaflow_stack.nomad.deployment import job_command

    class Flow:
        name = "F"

    environment = MetaflowEnvironment(Flow())
    step_cli = " ".join(["python", "flow.py", "step", "a", *util.dict_to_cli_options({"tag": AWKWARD})])
    ids = {"flow": "F", "run_id": "1", "step": "a", "task_id": "2", "attempt": 0}
    line = task_command(environment, ("s3", "s3://b/k"), ids, ("{}", "s3://b/k"), step_cli, workdir="/w", logs="/l")
    assert line[:2] == ["bash", "-c"] and len(line) == 3
    words = _split_by_bash(line[2], step_cli, tmp_path)
    assert words[5::2] == AWKWARD and set(words[4::2]) == {"--tag"}
    run = ["python", "-m", "metaflow_stack.nomad.dispatched", "flow.py", *AWKWARD]
    line = job_command(environment, "s3", ("{}", "s3://b/k"), run, False, False, False)
    assert line[:2] == ["bash", "-c"] and len(line) == 3
    assert _split_by_bash(line[2], shlex.join(run), tmp_path) == run


@pytest.mark.parametrize("namespace", ["*", 'b" {}\nagent { policy = "write" }\nnamespace "c', "it's", ""])
def test_a_deployed_flows_policy_names_only_namespaces(namespace: str) -> None:
    """Its steps' namespaces go into the deployed job's ACL policy (HCL) and into the line an operator is given
    to run: a ``*`` granted every namespace, a quote wrote rules of its own (an ``agent`` write, say)."""
    from metaflow_stack.nomad.deployment import steps_policy

    assert steps_policy("F", "default", ["default", "batch-2"])[1].count("namespace ") == 2
    with pytest.raises(StackError, match="is not a Nomad namespace name"):
        steps_policy("F", "default", ["default", namespace])
    with pytest.raises(StackError, match=r"is not a Nomad namespace name|must be a name"):
        Placement(namespace=namespace)


#: What ``nomad create`` writes in a deployed job's Meta for a flow with a parameter of each kind.
CREATED = {
    "metaflow.flow": "ScoreFlow",
    "metaflow.project_name": "fraud",
    "metaflow.parameters": json.dumps(
        {
            "alpha": {"python_var_name": "alpha", "name": "alpha", "type": "float", "description": "a '''",
                      "is_required": False},
            "data": {"python_var_name": "data", "name": "data", "type": "FilePath", "description": None,
                     "is_required": True, "is_text": True, "encoding": "utf-8"},
        }
    ),
}  # fmt: skip
#: Meta whoever may submit a job could write: each would have been Python in the file Metaflow makes to trigger.
FORGED = [
    {"metaflow.flow": "F(FlowSpec):\n    import os"},
    {"metaflow.project_name": "x')\nimport os#"},
    {"metaflow.parameters": '{"a": {"python_var_name": "a", "name": "a", "type": "id(1)", "is_required": false}}'},
    {"metaflow.parameters": '{"a": {"python_var_name": "a", "name": "a\')", "type": "str", "is_required": false}}'},
    {"metaflow.parameters": '{"a": {"python_var_name": "a=1;b", "name": "a", "type": "str", "is_required": false}}'},
    {"metaflow.parameters": '{"a": {"python_var_name": "a", "name": "a", "type": "str", "is_required": "1 or 2"}}'},
    {"metaflow.parameters": '{"a": {"python_var_name": "a", "name": "a", "type": "FilePath", "is_required": false, '
                            '"encoding": "u\', x=1"}}'},
    {"metaflow.parameters": "[1]"},
]  # fmt: skip


def test_a_deployed_flows_meta_is_read_back_as_create_wrote_it_and_nothing_else() -> None:
    """``DeployedFlow.from_nomad`` makes a flow file from a job's Meta and imports it, and anyone who may submit
    a job in the namespace writes Meta: each value is held to what ``create`` writes, a parameter's help
    (pasted in triple quotes) left out."""
    from metaflow.runner.deployer import generate_fake_flow_file_contents

    from metaflow_stack.nomad.deployment import deployment_facts

    flow, info, project = deployment_facts(CREATED)
    assert (flow, project, sorted(info)) == ("ScoreFlow", "fraud", ["alpha", "data"])
    assert info["alpha"]["description"] == "" and info["data"]["encoding"] == "utf-8"
    compile(generate_fake_flow_file_contents(flow, info, project), "flow.py", "exec")  # (help's ''' gone)
    for forged in FORGED:
        with pytest.raises(StackError, match=r"metaflow\.(flow|project_name|parameters)"):
            deployment_facts({**CREATED, **forged})


def test_a_deployed_jobs_script_reads_its_credentials_before_it_fetches_its_package() -> None:
    """Through its own agent's Task API; the install Metaflow's commands skip where the image has what they
    need is said to the script's shell alone (not exported: a step's job with an image of its own still
    installs it)."""
    from metaflow.metaflow_environment import MetaflowEnvironment

    from metaflow_stack.nomad.deployment import job_command

    class Flow:
        name = "F"

    run = ["python", "-m", "metaflow_stack.nomad.dispatched", "flow.py"]
    line = job_command(MetaflowEnvironment(Flow()), "s3", ("{}", "s3://b/k"), run, True, True, True)
    assert line[:2] == ["bash", "-c"]
    script = line[2]
    order = [
        script.index("METAFLOW_SKIP_INSTALL_DEPENDENCIES=1 &&"),
        script.index("export NOMAD_ADDR=unix://$NOMAD_SECRETS_DIR/api.sock"),
        script.index("{ secrets=$(python -m metaflow_stack.nomad.job_secrets) || { sleep 2; exit 1; }; }"),
        script.index("if [ -z $METAFLOW_SKIP_INSTALL_DEPENDENCIES ]"),
        script.index("exec python -m metaflow_stack.nomad.dispatched flow.py"),
    ]
    assert order == sorted(order) and "export METAFLOW_SKIP_INSTALL_DEPENDENCIES" not in script
    plain = job_command(MetaflowEnvironment(Flow()), "s3", ("{}", "s3://b/k"), run, False, False, False)[2]
    assert "NOMAD_ADDR" not in plain and "job_secrets" not in plain and "SKIP_INSTALL_DEPENDENCIES=1" not in plain
