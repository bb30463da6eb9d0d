"""``@nomad``'s client and watcher against a Nomad HTTP API: here the double in ``tests/nomad_double``
(its docker tasks on the local engine), in the GitHub workflow's ``clusters`` job a real ``nomad agent
-dev`` (``NOMAD_ADDR`` set: the same tests, the double not started)."""

from __future__ import annotations

import contextlib
import http.server
import os
import shlex
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import registry_manifest
from devservers import free_port
from nomad_jobs import run_job

from metaflow_stack.deploy import nomad as deploy
from metaflow_stack.engines.nomad.client import NomadClient, NotFound, Settings
from metaflow_stack.engines.nomad.jobspec import Placement, constraints_of, task_job
from metaflow_stack.engines.nomad.watch import LOST_FILES, Unplaced
from metaflow_stack.errors import StackError

pytestmark = [pytest.mark.docker]


def test_a_task_runs_its_logs_stream_and_its_real_exit_code_comes_back(nomad_agent: Settings, base_image: str) -> None:
    """(A last line without its newline is checked on raw_exec, whose logs are the bytes written: Nomad's docker
    log collector follows Docker's stream, which drops such a line, moby#43860.)"""
    script = 'echo "$GREETING out"; echo err >&2; sleep 2; exit 3'
    ending, lines = run_job(nomad_agent, Placement(image=base_image, cpu=0.5, memory=256), script)
    assert ending.code == 3 and ending.status == "failed"
    assert [line for kind, line in lines if kind == "stdout"] == ["hello out"]
    assert [line for kind, line in lines if kind == "stderr"] == ["err"]


def test_a_running_task_is_watched_with_blocking_queries_not_polled(nomad_agent: Settings) -> None:
    """The allocation is read with Nomad's blocking queries (``index`` and ``wait``: the agent answers when
    it changes), so a task of a few seconds costs a few requests, not one a second or a busy loop. What
    the client sent is the double's record (a real agent keeps none)."""
    if os.environ.get("NOMAD_ADDR"):
        pytest.skip("the requests are counted by the double, which a real agent is not")

    def made() -> list[dict]:
        headers = {"X-Nomad-Token": nomad_agent.token} if nomad_agent.token else {}
        return httpx.get(f"{nomad_agent.address}/_double/requests", headers=headers).json()

    before = len(made())
    ending, _ = run_job(nomad_agent, Placement(driver="raw_exec", cpu=0.5, memory=64), "sleep 5; echo done")
    assert ending.code == 0
    reads = [r for r in made()[before:] if r["method"] == "GET" and r["path"].startswith("/v1/allocation/")]
    assert len({r["path"] for r in reads}) == 1, reads  # (this job's one allocation: the tests here run one at a time)
    assert 1 <= len(reads) <= 8, reads
    assert all("index" in r["query"] and r["query"].get("wait") for r in reads[1:]), reads


def test_raw_exec_runs_the_command_as_a_process_in_its_task_folder(nomad_agent: Settings) -> None:
    script = 'echo "$GREETING from $PWD"; test "$PWD" = "$(dirname "$NOMAD_TASK_DIR")" && echo "in the task folder"'
    script += '; printf "partial"; exit 4'
    ending, lines = run_job(nomad_agent, Placement(driver="raw_exec", cpu=0.5, memory=64), script)
    assert ending.code == 4 and ending.status == "failed"
    out = [line for kind, line in lines if kind == "stdout"]
    assert out[0].startswith("hello from /") and out[1:] == ["in the task folder", "partial"]  # the last, unended


def test_a_task_ended_by_a_signal_comes_back_as_128_plus_the_signal(nomad_agent: Settings) -> None:
    """As a shell says it: Nomad's executor reports a signalled process with ``ExitCode`` 128 plus the signal
    and the signal itself, which ``nomad step`` exits with (Metaflow counts the attempt failed)."""
    ending, _ = run_job(nomad_agent, Placement(driver="raw_exec", cpu=0.5, memory=64), "kill -KILL $$")
    assert (ending.code, ending.signal, ending.status) == (137, 9, "failed")


def test_nomad_reads_a_tasks_arguments_as_templates_so_the_job_escapes_them(nomad_agent: Settings) -> None:
    """A shell's ``${X:-y}`` in a task's arguments, as written, fails the task before it runs (Nomad parses
    them as HCL templates); as the job spec writes it (escaped), the shell gets it whole."""
    script = 'echo "in ${NOMAD_TASK_DIR:-/nowhere}"'
    placement = Placement(driver="raw_exec", cpu=0.5, memory=64)

    def unescaped(job: dict) -> None:
        job["TaskGroups"][0]["Tasks"][0]["Config"]["args"] = ["-c", script]

    refused, _ = run_job(nomad_agent, placement, script, edit=unescaped)
    assert refused.code is None and refused.status == "failed" and refused.reason
    ending, lines = run_job(nomad_agent, placement, script)
    assert ending.code == 0
    (said,) = [line for kind, line in lines if kind == "stdout"]
    assert said.startswith("in /") and not said.startswith("in /nowhere")


def test_a_log_rotated_into_several_files_reaches_the_console_whole_and_in_order(nomad_agent: Settings) -> None:
    """Nomad's log collector starts a new file when one reaches ``LogConfig.MaxFileSizeMB``; the stream
    follows into it."""

    def one_megabyte_files(job: dict) -> None:
        job["TaskGroups"][0]["Tasks"][0]["LogConfig"] = {"MaxFiles": 10, "MaxFileSizeMB": 1}

    count = 300_000  # about 2 MB of numbers: two files
    placement = Placement(driver="raw_exec", cpu=0.5, memory=128)
    ending, lines = run_job(nomad_agent, placement, f"seq 1 {count}", edit=one_megabyte_files)
    assert ending.code == 0
    assert [line for kind, line in lines if kind == "stdout"] == [str(i) for i in range(1, count + 1)]


def test_a_log_file_deleted_under_its_reader_ends_that_file_not_the_stream(nomad_agent: Settings) -> None:
    """Nomad keeps ``LogConfig.MaxFiles`` files of a log: the oldest is deleted as a new one begins. A file
    deleted while it is read ends with a ``file deleted`` frame, and Nomad's stream goes on with the next
    file. The reader waits at the end of the first file (the task sleeps), then one file's worth and more
    arrives at once: the first file is deleted under it, and what follows still reaches the console."""

    def one_file_kept(job: dict) -> None:
        job["TaskGroups"][0]["Tasks"][0]["LogConfig"] = {"MaxFiles": 1, "MaxFileSizeMB": 1}

    first, last = 100_000, 400_000  # (under 1 MB, then about 2.3 MB more: two rotations)
    script = f"seq 1 {first}; sleep 3; seq {first + 1} {last}"
    placement = Placement(driver="raw_exec", cpu=0.5, memory=128)
    ending, lines = run_job(nomad_agent, placement, script, edit=one_file_kept)
    assert ending.code == 0
    said = [line for kind, line in lines if kind == "stdout"]
    assert said[:first] == [str(n) for n in range(1, first + 1)]  # (read before any file was deleted)
    assert said[-1] == str(last)
    # A file deleted before it was read is said, and the line it cut ends there: not glued to the next file's.
    assert all(line == f"(stdout: {LOST_FILES})" or (line.isdigit() and int(line) <= last) for line in said)


def test_exec_runs_where_the_agent_offers_it_and_is_filtered_where_not(nomad_agent: Settings) -> None:
    """A real agent run as root (the GitHub job's) offers exec; the double's node, like an agent run as
    another user, has no exec driver, and Nomad's scheduler filters such a job out at once."""
    placement = Placement(driver="exec", cpu=0.5, memory=64)
    if os.environ.get("NOMAD_ADDR"):
        ending, lines = run_job(nomad_agent, placement, 'echo "$GREETING chrooted"')
        assert ending.code == 0 and ("stdout", "hello chrooted") in lines
        return
    with pytest.raises(Unplaced) as caught:
        run_job(nomad_agent, placement, "true")
    assert "missing drivers" in caught.value.message


def test_the_default_image_is_the_stack_base_where_the_nomad_clients_can_pull_it(
    base_image: str, local_registry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a registry configured, the stack's base image is pushed there and named by what was pushed (its
    digest: a later push to its tag, anyone's, does not change what the jobs run); with none, a dev
    agent on this machine (it shares this Docker engine) takes the local image, and one elsewhere is refused
    in one line naming both fixes."""
    from metaflow_stack.engines.nomad.image import stack_image

    remote = Settings(address="http://10.20.30.40:4646")
    pushed = stack_image(remote, "@nomad(image=...)")
    repository, tag = base_image.rsplit(":", 1)
    assert pushed.startswith(f"{local_registry}/{repository}@sha256:"), pushed
    # (what the push stored; not pulled here: a pull by digest would leave the engine holding the manifest,
    # which the published-images tests must not find)
    assert registry_manifest(local_registry, repository, tag).headers["Docker-Content-Digest"] == pushed.split("@")[1]
    from metaflow_stack.pool import kubernetes_pool

    assert kubernetes_pool.stack_image() == pushed  # (a pool's pods, the same way)
    monkeypatch.delenv("METAFLOW_STACK_REGISTRY")
    assert stack_image(Settings(address="http://127.0.0.1:4646"), "@nomad(image=...)") == base_image
    with pytest.raises(StackError) as refused:
        stack_image(remote, "@nomad(image=...)")
    assert "is only on this machine" in refused.value.message
    assert "METAFLOW_STACK_REGISTRY" in refused.value.fix and "@nomad(image=...)" in refused.value.fix


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"gpu": 1}, "filtered by missing devices"),
        ({"constraints": constraints_of([{"attribute": "${attr.kernel.name}", "value": "plan9"}])}, "filtered by"),
        ({"datacenters": ("mars",)}, "no node in the job's datacenters"),
        ({"memory": 10_000_000}, "no node could ever hold it (memory MB: asks 10000000, the most a node has is"),
    ],
    ids=["gpu", "constraint", "datacenter", "memory"],
)
def test_a_job_no_node_can_take_fails_in_seconds_with_nomads_reason(
    nomad_agent: Settings, base_image: str, settings: dict, words: str
) -> None:
    started = time.monotonic()
    with pytest.raises(Unplaced) as caught:
        run_job(nomad_agent, Placement(**{"image": base_image, "memory": 64, **settings}), "true")
    assert words in caught.value.message and caught.value.fix
    assert time.monotonic() - started < 30


def test_a_job_waiting_for_room_is_queued_not_failed(nomad_agent: Settings, base_image: str) -> None:
    """More memory than the node has free, though no more than it has: Nomad keeps the job in a blocked
    evaluation; the watcher says why it waits and goes on waiting for the allocation instead of failing."""
    from metaflow_stack.engines.nomad.watch import wait_placed

    holder, name, said = f"mf-test-{uuid.uuid4().hex[:8]}", f"mf-test-{uuid.uuid4().hex[:8]}", []
    with NomadClient(nomad_agent) as client:
        (node,) = client.nodes(resources=True)[:1]
        room = node["NodeResources"]["Memory"]["MemoryMB"] - node["ReservedResources"]["Memory"]["MemoryMB"]
        most = Placement(image=base_image, memory=room * 3 // 5)  # (held, not used: Nomad reserves what is asked)
        try:
            wait_placed(client, client.register(task_job(holder, ["sleep", "600"], {}, most, {"t": "1"})), print)
            deadline = time.monotonic() + 120
            while {a["ClientStatus"] for a in client.allocations(holder)[0]} != {"running"}:
                assert time.monotonic() < deadline, "the job holding the memory never ran"
                time.sleep(0.2)
            eval_id = client.register(task_job(name, ["true"], {}, most, {"t": "1"}))
            wait_placed(client, eval_id, said.append)
        finally:
            client.deregister(name)
            client.deregister(holder)
    assert len(said) == 1 and "no Nomad node has room" in said[0] and "memory" in said[0]


def _lost(written: object, stored: object, at: str = "Job") -> list[str]:
    """Where ``stored`` does not hold ``written``: each field written, at any depth, must come back equal."""
    if isinstance(written, dict):
        if not isinstance(stored, dict):
            return [at]
        return [lost for key, value in written.items() for lost in _lost(value, stored.get(key), f"{at}.{key}")]
    if isinstance(written, list):
        if not isinstance(stored, list) or len(stored) != len(written):
            return [at]
        return [
            lost for n, (w, s) in enumerate(zip(written, stored, strict=True)) for lost in _lost(w, s, f"{at}[{n}]")
        ]
    return [] if written == stored else [f"{at}: wrote {written!r}, reads {stored!r}"]


def test_a_job_read_back_from_the_agent_holds_every_field_the_spec_wrote(nomad_agent: Settings) -> None:
    """Nomad's decoder drops a field it does not know without a word, so a misspelt one, or one the agent's
    version lacks, would be lost silently. Against a real agent (the GitHub ``clusters`` job) every field
    ``@nomad`` writes comes back as written: ``Restart`` and ``Reschedule`` attempts at 0, the GPU device
    and its constraints, ``Meta``, resources. (The double keeps what its schema let in, so here this checks
    the double's side.)"""
    placement = Placement(
        driver="raw_exec",
        cpu=0.5,
        memory=64,
        gpu=1,
        gpu_model="H100",
        gpu_memory=40000,
        datacenters=("dc1",),
        constraints=constraints_of([{"attribute": "${attr.kernel.name}", "value": "linux"}]),
    )
    name = f"mf-readback-{uuid.uuid4().hex[:8]}"
    written = task_job(name, ["true"], {"GREETING": "hello"}, placement, {"metaflow.flow": "ReadBack"})
    with NomadClient(nomad_agent) as client:
        client.register(written)
        try:
            stored = client.job(name)
        finally:
            client.deregister(name)
    assert _lost(written, stored) == []


@pytest.mark.parametrize("variables", [False, True], ids=["steps", "pools"])
def test_the_sweep_purges_only_the_jobs_whose_trampoline_is_gone(nomad_agent: Settings, variables: bool) -> None:
    """A trampoline killed outright leaves its job registered; the next run's start purges it, and only it:
    a live trampoline's job and a job that names none (another tool's) stay. A pool's sweep removes the
    purged job's variable too (its queue's URL); a step's sweep asks nothing of variables."""
    from conftest import ended_launcher

    from metaflow_stack.elsewhere import Launcher
    from metaflow_stack.engines.nomad.job_variable import variable_path
    from metaflow_stack.engines.nomad.orphans import OWNER, sweep

    prefix = f"mf-sweep-{uuid.uuid4().hex[:8]}-"
    owners = {"gone": ended_launcher(), "alive": Launcher.this().label, "foreign": "a-host:1"}
    placement = Placement(driver="raw_exec", cpu=0.1, memory=32)
    with NomadClient(nomad_agent) as client:
        for name, owner in owners.items():
            client.register(task_job(prefix + name, ["sleep", "60"], {}, placement, {OWNER: owner}))
            client.put_variable(variable_path(prefix + name), {"url": "redis://:pw@h:6379/0"})
        try:
            assert sweep(client, prefix, variables=variables) == 1
            assert sorted(job["ID"] for job in client.jobs(prefix)) == [prefix + "alive", prefix + "foreign"]
            for name in ("alive", "foreign"):
                assert client.variable(variable_path(prefix + name))
            if variables:
                with pytest.raises(NotFound):
                    client.variable(variable_path(prefix + "gone"))
            else:
                assert client.variable(variable_path(prefix + "gone"))
        finally:
            for name in owners:
                client.deregister(prefix + name)
                client.delete_variable(variable_path(prefix + name))


def test_a_runs_start_sweeps_the_namespace_of_each_nomad_step(
    nomad_agent: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trampoline killed outright in a step with ``@nomad(namespace=...)`` left its job in that namespace,
    where a sweep of the agent's default one never looks: the next run's start sweeps each namespace its
    steps use."""
    from conftest import ended_launcher

    from metaflow_extensions.stack.plugins.nomad.nomad_decorator import NomadDecorator
    from metaflow_stack.engines.nomad.orphans import OWNER

    namespace, job = f"mf-sweep-{uuid.uuid4().hex[:8]}", f"mf-sweep-{uuid.uuid4().hex[:8]}-gone"
    monkeypatch.setenv("NOMAD_ADDR", nomad_agent.address)
    if nomad_agent.token:
        monkeypatch.setenv("NOMAD_TOKEN", nomad_agent.token)
    monkeypatch.setattr(NomadDecorator, "swept", set())
    there = nomad_agent.at(namespace, None)
    with NomadClient(nomad_agent) as client:
        client.put_namespace(namespace, "a step's own")
    with NomadClient(there) as client:
        placement = Placement(driver="raw_exec", cpu=0.1, memory=32, namespace=namespace)
        client.register(task_job(job, ["sleep", "60"], {}, placement, {OWNER: ended_launcher()}))
        try:
            NomadDecorator._sweep_once(None, None)  # (a step in the default namespace: this job is not there)
            assert [j["ID"] for j in client.jobs(job)] == [job]
            NomadDecorator._sweep_once(namespace, None)
            assert client.jobs(job) == []
        finally:
            client.deregister(job)


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], dict[str, str], Any]]:
    """An agent with TLS that verifies its clients (``tls { http = true, verify_https_client = true }``): the
    double, with a CA of the test's own, wherever the tests run. Its variables as Nomad's CLI reads them
    (``METAFLOW_NOMAD_ADDR`` to it, over a ``NOMAD_ADDR`` that reaches nothing), the client certificate's,
    and the certificate files."""
    import tls_files
    from devservers import nomad_double

    files, port, token = tls_files.issue(tmp_path_factory.mktemp("tls")), free_port(), uuid.uuid4().hex
    tls = ("--tls-cert", str(files.server_cert), "--tls-key", str(files.server_key), "--tls-client-ca", str(files.ca))
    base = {"METAFLOW_NOMAD_ADDR": f"https://127.0.0.1:{port}", "NOMAD_ADDR": "http://127.0.0.1:9"}
    client_cert = {"NOMAD_CLIENT_CERT": str(files.client_cert), "NOMAD_CLIENT_KEY": str(files.client_key)}
    with nomad_double("--token", token, *tls, port=port):
        yield {**base, "NOMAD_TOKEN": token}, client_cert, files


def _jobs(env: dict[str, str]) -> list:
    with NomadClient(Settings.from_env(env)) as client:
        return client.jobs("mf-")


@pytest.mark.parametrize(
    ("settings", "fix"),
    [
        ({"client_cert": True}, "set NOMAD_CACERT to the CA that signed it"),
        ({"ca": True}, "set NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY"),
        ({"ca": True, "client_cert": True, "host": "localhost"}, "a name its certificate holds"),
        ({"ca": "missing.pem"}, "readable PEM files"),
    ],
    ids=["untrusted-agent", "no-client-certificate", "another-host-name", "unreadable-ca"],
)
def test_a_tls_connection_nomad_or_this_machine_refuses_is_one_line_naming_its_fix(
    tls_agent, settings: dict, fix: str
) -> None:
    """The agent's certificate is verified (unlike python-nomad's default), against ``NOMAD_CACERT``: each
    refusal, either side's, says what to set."""
    base, client_cert, files = tls_agent
    env = {**base, **(client_cert if settings.get("client_cert") else {})}
    if ca := settings.get("ca"):
        env["NOMAD_CACERT"] = str(files.ca if ca is True else files.ca.parent / ca)
    if host := settings.get("host"):
        env["METAFLOW_NOMAD_ADDR"] = env["METAFLOW_NOMAD_ADDR"].replace("127.0.0.1", host)
    with pytest.raises(StackError) as refused:
        _jobs(env)
    assert fix in refused.value.fix and "Traceback" not in refused.value.message, refused.value.message


@pytest.mark.parametrize("verified", [True, False], ids=["against-its-ca", "skip-verify"])
def test_a_client_certificate_reaches_an_agent_that_verifies_its_clients(tls_agent, verified: bool) -> None:
    """The client's certificate is presented beside a CA file (httpx alone drops it there), and with
    ``NOMAD_SKIP_VERIFY``."""
    base, client_cert, files = tls_agent
    trust = {"NOMAD_CACERT": str(files.ca)} if verified else {"NOMAD_SKIP_VERIFY": "true"}
    assert _jobs({**base, **client_cert, **trust}) == []


def test_secrets_deployed_to_nomad_variables_verify_the_agent_as_nomad_does(
    tls_agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deploying a server's secrets to Nomad Variables (python-nomad, which verifies nothing by default)
    takes the same settings: refused without the CA, stored with it."""
    base, client_cert, files = tls_agent
    for name, value in {**base, "NOMAD_ADDR": base["METAFLOW_NOMAD_ADDR"], **client_cert}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StackError, match="CERTIFICATE_VERIFY_FAILED"):
        deploy.put_variables("nomad/jobs/tls-check", {"auth_key": "k"})
    monkeypatch.setenv("NOMAD_CACERT", str(files.ca))
    deploy.put_variables("nomad/jobs/tls-check", {"auth_key": "k"})


def test_an_allocation_nomad_no_longer_knows_ends_the_attempt_as_lost(tmp_path) -> None:
    """The agent restarts mid-task and has forgotten the allocation (a dev agent keeps its state in memory;
    a purge and a GC do the same): the watcher rides out the outage, then ends the attempt as lost, which
    ``@retry`` runs again, instead of waiting for an allocation that will not come back."""
    from devservers import nomad_double

    from metaflow_stack.engines.nomad.watch import follow

    if os.environ.get("NOMAD_ADDR"):
        pytest.skip("a real agent is not restarted under the other tests; the double stands in for one that was")
    token, port, name = uuid.uuid4().hex, free_port(), f"mf-test-{uuid.uuid4().hex[:8]}"
    agent, outcome = Settings(address=f"http://127.0.0.1:{port}", token=token), {}
    job = task_job(name, ["sh", "-c", "echo started; sleep 60"], {}, Placement(driver="raw_exec", memory=32), {})
    started = threading.Event()

    def watch() -> None:
        with NomadClient(agent) as client:
            relay = lambda kind, line: started.set() if line == "started" else None  # noqa: E731
            outcome["ending"] = follow(client, name, client.register(job), relay)

    with nomad_double("--token", token, port=port):
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert started.wait(30)
    with nomad_double("--token", token, port=port):  # the same address, none of the state
        watcher.join(60)
    ending = outcome["ending"]
    assert ending.code is None and ending.status == "lost" and "no longer knows its allocation" in ending.reason


def test_a_job_nomad_refuses_is_said_once_not_again_as_a_purge_that_failed(
    nomad_agent: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token that may read jobs but not submit them: the registration's refusal names the token, and the
    purge that follows (Nomad may have taken a job whose answer was lost) adds no second, misleading line."""
    from metaflow_stack.nomad import task

    if not nomad_agent.token:
        pytest.skip("this agent has no ACLs (a dev agent), so any token may submit")
    with NomadClient(nomad_agent) as admin:
        admin.put_policy("mf-test-read", 'namespace "default" { capabilities = ["list-jobs", "read-job"] }', "test")
        reader = Settings(address=nomad_agent.address, token=admin.create_token("reader", ["mf-test-read"])["SecretID"])
    with NomadClient(reader) as client, pytest.raises(StackError) as refused:
        task.run(client, f"mf-test-{uuid.uuid4().hex[:8]}", ["true"], {}, Placement(image="i:t"), {"t": "1"})
    assert "NOMAD_TOKEN" in refused.value.fix
    assert "could not purge" not in capsys.readouterr().err


@pytest.mark.docker
def test_an_image_with_an_entrypoint_of_its_own_runs_the_tasks_command(
    nomad_agent: Settings, base_image: str, docker_engine, tmp_path
) -> None:
    """A step's own image may name an ENTRYPOINT (``["python"]``, say): the task's command replaces it, as with
    ``@kubernetes``, rather than reaching it as arguments."""
    (tmp_path / "Dockerfile").write_text(f'FROM {base_image}\nENTRYPOINT ["false"]\n')
    tag = f"metaflow-stack/test-entrypoint:{uuid.uuid4().hex[:8]}"
    docker_engine.legacy_build(str(tmp_path), tags=[tag])
    try:
        ending, lines = run_job(nomad_agent, Placement(image=tag, memory=64), "echo ran as asked")
    finally:
        docker_engine.image.remove(tag, force=True)
    assert ending.code == 0 and ("stdout", "ran as asked") in lines, lines


def test_an_image_that_cannot_start_has_no_exit_code_and_says_why(nomad_agent: Settings) -> None:
    ending, _ = run_job(nomad_agent, Placement(image="metaflow-stack/no-such-image:none", memory=64), "true")
    assert ending.code is None and ending.status == "failed" and ending.reason


def test_a_wrong_token_or_address_is_one_line_naming_the_fix(nomad_agent: Settings) -> None:
    if nomad_agent.token:  # (an agent with ACLs: the double; a dev agent has none and takes any token)
        wrong = Settings(address=nomad_agent.address, token="wrong")
        with NomadClient(wrong) as client, pytest.raises(StackError) as refused:
            client.jobs("mf-")
        assert "NOMAD_TOKEN" in refused.value.fix
    with NomadClient(Settings(address=f"http://127.0.0.1:{free_port()}")) as client, pytest.raises(StackError) as gone:
        client.jobs("mf-")
    assert "no Nomad agent answers" in gone.value.message and "NOMAD_ADDR" in gone.value.fix
    for address in ("http://127.0.0.1:notaport", "http://[::1", "127.0.0.1:4646"):
        with pytest.raises(StackError) as malformed:
            NomadClient(Settings(address=address))
        assert (
            f"NOMAD_ADDR={address} is no address" in malformed.value.message
            and "http://HOST:4646" in malformed.value.fix
        )


@contextlib.contextmanager
def answering(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[Settings]:
    """Settings for something other than a Nomad agent, answering every request with ``handler``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Settings(address=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


class Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("route", ["jobs", "logs"])
def test_an_answer_that_never_ends_is_one_line_in_bounded_memory(monkeypatch: pytest.MonkeyPatch, route: str) -> None:
    """Something other than Nomad at NOMAD_ADDR (or a broken proxy) may answer without end: the client stops
    reading at its limit. A log's error answer too, which was read whole (its reader asks again in a loop:
    150 MB took 600 MB)."""
    from metaflow_stack.engines.nomad import client as nomad_client

    class Endless(Quiet):
        def do_GET(self) -> None:
            self.send_response(500 if route == "logs" else 200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                for _ in range(10_000):  # 640 MB at most: the client must stop long before
                    self.wfile.write(b"[" + b" " * 65535)
            except (BrokenPipeError, ConnectionResetError):
                pass

    monkeypatch.setattr(nomad_client, "MAX_ANSWER", 1 << 20)
    with answering(Endless) as settings, NomadClient(settings) as client, pytest.raises(StackError) as refused:
        if route == "jobs":
            client.jobs("mf-")
        else:
            with client.logs("alloc", "metaflow", "stdout", follow=False):
                pass
    assert "is over 1 MB" in refused.value.message and "NOMAD_ADDR" in refused.value.fix


def test_an_answer_that_trickles_is_given_up_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server (or a proxy) that sends a byte now and then never trips httpx's timeouts, which are per read:
    the answer must be whole within its read timeout and the slack, or the call fails as unavailable (it
    held the call for as long as the server liked)."""
    from metaflow_stack.engines.nomad import client as nomad_client
    from metaflow_stack.engines.nomad.client import Unavailable

    class Trickle(Quiet):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            try:
                for _ in range(600):  # a minute at most: the client must stop long before
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass

    monkeypatch.setattr(nomad_client, "CONNECT_S", 0.5)
    monkeypatch.setattr(nomad_client, "SLACK_S", 0.5)
    started = time.monotonic()
    with answering(Trickle) as settings, NomadClient(settings) as client, pytest.raises(Unavailable) as refused:
        client.jobs("mf-")
    assert "not whole in time" in refused.value.message and "NOMAD_ADDR" in refused.value.fix
    assert time.monotonic() - started < 10


def test_a_followed_log_gone_silent_is_given_up_for_its_reader_to_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    """A followed log stream that stops carrying even Nomad's heartbeats went half-open (a partition, a proxy's
    idle cut): reading it fails as unavailable, which its reader resumes from where it was, rather than
    waiting on it for the rest of the task."""
    from metaflow_stack.engines.nomad import client as nomad_client
    from metaflow_stack.engines.nomad.client import Unavailable

    class Silent(Quiet):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"Data": "b25lCg==", "Offset": 4, "File": "alloc/logs/metaflow.stdout.0"}')
            self.wfile.flush()
            time.sleep(10)

    monkeypatch.setattr(nomad_client, "FOLLOW_READ_S", 0.5)
    read, started = bytearray(), time.monotonic()
    with (
        answering(Silent) as settings,
        NomadClient(settings) as client,
        pytest.raises(Unavailable),
        client.logs("alloc", "metaflow", "stdout") as chunks,
    ):
        for chunk in chunks:
            read += chunk
    assert b"b25lCg==" in read and time.monotonic() - started < 5


def test_a_blocking_query_answered_with_index_0_still_waits() -> None:
    """An answer whose index reads as 0 (an agent or a proxy that sends none, or 0): the next query asks from
    index 1 with a wait, which Nomad holds until something changes, rather than with none, which it would
    answer at once, again and again."""
    asked: list[str] = []

    class Empty(Quiet):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Nomad-Index", "0")
            self.end_headers()
            self.wfile.write(b"[]")

    with answering(Empty) as settings, NomadClient(settings) as client:
        _, index = client.allocations("mf-job", 0)
        client.allocations("mf-job", index)
    assert "index=" not in asked[0] and "index=1&wait=" in asked[1], asked


#: Run in a task: list the task's own job and read its job's variable through its agent's Task API, with its
#: workload identity and with no token, printing how each went.
TASK_API = """
import os, time
from metaflow_stack.engines.nomad.client import NomadClient, Settings
from metaflow_stack.errors import StackError
socket, job = "unix://" + os.environ["NOMAD_SECRETS_DIR"] + "/api.sock", os.environ["NOMAD_JOB_ID"]
for who, token in (("identity", os.environ.get("NOMAD_TOKEN")), ("anonymous", None)):
    with NomadClient(Settings(address=socket, token=token, namespace=os.environ["NOMAD_NAMESPACE"])) as client:
        asks = (("jobs", lambda: client.jobs(job)), ("variable", lambda: client.variable("nomad/jobs/" + job)))
        for what, ask in asks:
            try:
                said = "read" if ask() else "none"
            except StackError as exc:
                said = type(exc).__name__
            print(who, what, said, flush=True)
time.sleep(2)  # (Nomad's docker log collector stops when the container does: the last lines need a moment)
"""


@pytest.mark.parametrize("driver", ["raw_exec", "docker"])
def test_a_task_reaches_its_agent_through_the_task_api_as_its_workload(
    nomad_agent: Settings, base_image: str, driver: str
) -> None:
    """The Task API (``$NOMAD_SECRETS_DIR/api.sock``, mounted into a container) takes the task's workload
    identity and refuses a request without one; the identity reads its own job's variable; with ACLs on, it
    holds nothing else but the policies bound to its job."""
    from metaflow_stack.nomad.deployment import grant_steps

    with NomadClient(nomad_agent) as client:
        acls = client.acls_enabled()
    placement = Placement(driver=driver, image=base_image if driver == "docker" else None, cpu=0.5, memory=256)
    said = {}
    for bound in (False, True):

        def identity(job: dict, bound: bool = bound) -> None:
            job["TaskGroups"][0]["Tasks"][0]["Identity"] = {"Env": True}
            with NomadClient(nomad_agent) as client:
                client.put_variable(f"nomad/jobs/{job['ID']}", {"SECRET": "kept"})
                if bound:
                    assert grant_steps(client, job["ID"], ["default"], granted_before=False) is None

        ending, lines = run_job(nomad_agent, placement, f"python -c {shlex.quote(TASK_API)}", edit=identity)
        assert ending.code == 0, lines
        said[bound] = {tuple(line.split()[:2]): line.split()[2] for kind, line in lines if kind == "stdout"}
    refused = {("anonymous", "jobs"): "Refused", ("anonymous", "variable"): "Refused"}
    assert said[True] == {("identity", "jobs"): "read", ("identity", "variable"): "read", **refused}
    unbound = "Refused" if acls else "read"
    assert said[False] == {("identity", "jobs"): unbound, ("identity", "variable"): "read", **refused}
