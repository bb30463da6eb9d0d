"""``confidential step``: the trampoline Metaflow's runtime launches for a ``@confidential`` task.

It rebuilds the real step command from its own options (as Metaflow's
``kubernetes step`` does). With Gramine, ``metaflow_stack.confidential.launcher``
prepares the step's enclave (once per code and settings), orders the task
into it and judges its evidence; on Phala Cloud, ``confidential.cvm`` runs
the task as the step's dstack app in a TDX VM, judging its evidence the
same way. Either records the verification in the task's metadata and exits
with the task's code; 202 (Metaflow's "do not retry") when the TEE cannot
be made or its evidence is refused.
"""

from __future__ import annotations

import json
import os
import sys

from metaflow._vendor import click

from metaflow_stack.trampolines import step_parameters


@click.group()
def cli() -> None:
    pass


@cli.group(help="Run steps in Trusted Execution Environments.")
def confidential() -> None:
    pass


@confidential.command(help="Run one task of a @confidential step in its enclave (Metaflow calls this).")
@step_parameters
@click.option("--backend", default="gramine")
@click.option("--mode", default="direct")
@click.option("--policy", default=None)
@click.option("--enclave-size", default="4G")
@click.option("--threads", type=int, default=32)
@click.option("--collateral", default=None)
@click.option("--pccs-url", default=None)
@click.option("--isv-prod-id", type=int, default=0)
@click.option("--isv-svn", type=int, default=0)
@click.option("--trust", default="")
@click.option("--image", default=None)
@click.option("--instance-type", default="tdx.small")
@click.option("--container", is_flag=True, help="Gramine's: run the enclave in the step's own image.")
@click.option("--gramine-image", default=None, help="What the step's own image builds FROM (resolved by the run).")
@click.option("--run-time-limit", type=int, default=None, help="A CVM's seconds to run once booted (@timeout's).")
@click.pass_context
def step(
    ctx,
    step_name: str,
    code_package_metadata: str,
    code_package_sha: str,
    code_package_url: str,
    backend: str,
    mode: str,
    policy: str | None,
    enclave_size: str,
    threads: int,
    collateral: str | None,
    pccs_url: str | None,
    isv_prod_id: int,
    isv_svn: int,
    trust: str,
    image: str | None,
    instance_type: str,
    run_time_limit: int | None,
    container: bool,
    gramine_image: str | None,
    **kwargs,
) -> None:
    from metaflow.metadata_provider import MetaDatum
    from metaflow.util import decompress_list

    from metaflow_stack import settings
    from metaflow_stack.confidential import launcher
    from metaflow_stack.confidential.attest import TaskIdentity
    from metaflow_stack.confidential.input_records import snapshot
    from metaflow_stack.confidential.keyring import KeeperUnavailable
    from metaflow_stack.confidential.lineage import first_run
    from metaflow_stack.datastore import CONFIDENTIAL_FIELD
    from metaflow_stack.trampolines import exits_in_one_line, say, step_command

    flow_name = ctx.obj.flow.name
    run_id, task_id, attempt = kwargs["run_id"], kwargs["task_id"], int(kwargs["retry_count"])
    command, env = step_command(ctx, step_name, kwargs)
    pathspec = f"{flow_name}/{run_id}/{step_name}/{task_id}"
    with exits_in_one_line(f"{pathspec}: stopped; its enclave was stopped"):
        stack = settings.load()
        state_dir = stack.state_dir
        chosen = launcher.Settings(
            mode, enclave_size, threads, policy, collateral, pccs_url, isv_prod_id, isv_svn, tuple(trust.split())
        )  # fmt: skip
        keeper = launcher.keeper(state_dir, chosen, stack.key_release_url)
        try:
            keeper_key = keeper.public_key()
        except KeeperUnavailable as exc:  # nothing was judged: this attempt may be retried
            say(exc)
            sys.exit(1)
        identity = TaskIdentity(
            flow=flow_name, run=run_id, step=step_name, task=task_id, attempt=attempt, code_digest=code_package_sha,
            lineage=first_run(ctx.obj.metadata, flow_name, kwargs.get("clone_run_id")),
        )  # fmt: skip
        facts: dict = {}  # what the TEE is, beside its verification: its MRENCLAVE, or its CVM and app

        def record(verification: dict) -> None:
            datum = MetaDatum(field=CONFIDENTIAL_FIELD, value=json.dumps({**verification, **facts}),
                              type=CONFIDENTIAL_FIELD, tags=[f"attempt_id:{attempt}"])  # fmt: skip
            ctx.obj.metadata.register_metadata(run_id, step_name, task_id, [datum])

        package = (code_package_metadata, code_package_sha, code_package_url)
        # Its inputs' records as they are now, bound into the order: the TEE holds what it reads to them.
        paths = decompress_list(kwargs["input_paths"]) if kwargs.get("input_paths") else []
        inputs = snapshot(ctx.obj.flow_datastore, paths)
        if backend == "phala":
            code = _on_phala(ctx, step_name, identity, command, env, inputs, chosen, keeper, keeper_key, record,
                             facts, package, image or "", instance_type, run_time_limit)  # fmt: skip
        else:
            code = _in_gramine(ctx, identity, command, env, inputs, chosen, keeper, keeper_key, record, facts, package,
                               container, gramine_image)  # fmt: skip
    sys.exit(code)


def _in_gramine(
    ctx, identity, command, env, inputs, chosen, keeper, keeper_key, record, facts, package, container, gramine_image
) -> int:
    """The task in the step's Gramine enclave: with this machine's Gramine (``launcher``), or in the step's own
    image (``step_image``, ``container``)."""
    from metaflow_stack import code_package, settings
    from metaflow_stack.confidential import launcher

    flow_datastore, state_dir = ctx.obj.flow_datastore, settings.load().state_dir
    metadata, sha, url = package
    code = code_package.unpacked_here(flow_datastore, url, sha)
    if flow_datastore.TYPE == "local":
        datastore = flow_datastore._storage_impl.datastore_root
    else:  # the task reaches its datastore over the network: an empty folder stands in, never the code
        datastore = str(state_dir / "confidential" / "no-local-datastore")
        os.makedirs(datastore, exist_ok=True)
    code_env = {"METAFLOW_CODE_METADATA": metadata, "METAFLOW_CODE_SHA": sha, "METAFLOW_CODE_URL": url,
                "METAFLOW_CODE_DS": flow_datastore.TYPE}  # fmt: skip
    if container:  # with the step's environment, as Metaflow solved it for the image's platform
        from metaflow_stack.confidential import PLATFORM, step_image
        from metaflow_stack.solved_environment import solved

        below = gramine_image or step_image.gramine_image()  # (a trampoline called by hand resolves it)
        environment = solved(ctx.obj.environment, identity.step, PLATFORM)
        image = step_image.build(code, datastore, chosen, state_dir, code_env, keeper_key, below, environment)
        facts["mr_enclave"], facts["image"], evidence = image.mr_enclave, image.reference, image.exchanges
        start = step_image.in_container(image, chosen.mode, datastore, flow_datastore.flow_name)
    else:
        prepared = launcher.enclave(code, datastore, chosen, state_dir, code_env, keeper_key)
        facts["mr_enclave"], evidence = prepared.mr_enclave, prepared.folder / "evidence"
        start = launcher.on_this_machine(prepared, chosen.mode)
    return launcher.run_task(evidence, start, identity, command, env, inputs, chosen, keeper, record)


def _on_phala(
    ctx,
    step_name,
    identity,
    command,
    env,
    inputs,
    chosen,
    keeper,
    keeper_key,
    record,
    facts,
    package,
    image,
    instance_type,
    run_time_limit,
) -> int:
    """The task as the step's dstack app in a TDX VM on Phala Cloud (``cvm``), its exchange in the datastore;
    the task's metadata brought back after (local metadata: the CVM wrote it to the datastore)."""
    from metaflow.metaflow_config import DEFAULT_RUNTIME_LIMIT

    from metaflow_stack import settings
    from metaflow_stack.confidential import cvm
    from metaflow_stack.confidential.exchange import InDatastore, prefix_of
    from metaflow_stack.confidential.launcher import Judge, new_order
    from metaflow_stack.confidential.ledger import Ledger
    from metaflow_stack.confidential.phala import PhalaCloud
    from metaflow_stack.elsewhere import bring_back_metadata, step_environment, task_variables

    obj = ctx.obj
    task = new_order(identity, command, env, inputs, keeper)
    if task is None:
        return 1
    where = prefix_of(identity.flow, identity.run, identity.step, identity.task, identity.attempt, task.nonce)
    exchange = InDatastore(obj.flow_datastore._storage_impl, where)
    measured = cvm.measured_variables(keeper_key, chosen.policy or "", chosen.trust)
    app = cvm.app_for(
        image, obj.environment, (obj.flow_datastore.TYPE, obj.flow_datastore.datastore_root), package,
        task_variables(obj, step_name, package, {}), step_environment(obj, step_name), task, measured,
    )  # fmt: skip
    judge = Judge(exchange, task, chosen, keeper, record)
    logs = _log_tailers(obj.flow_datastore, identity)
    cloud, ledger = PhalaCloud(), Ledger(settings.load().state_dir)
    try:
        name = cvm.cvm_name(identity.flow, identity.run, identity.step, identity.task, identity.attempt)
        limit = run_time_limit or DEFAULT_RUNTIME_LIMIT  # (a trampoline called by hand: Metaflow's default)
        code = cvm.run(cloud, name, instance_type, app, exchange, judge, facts.update, ledger, limit, logs)
    finally:
        cloud.close()
    missing = bring_back_metadata(obj, identity.run, step_name, identity.task)
    if missing and code == 0:  # a task refused or stopped early wrote none, and its error says why
        print(f"{identity.flow}/{identity.run}/{step_name}/{identity.task}: {missing} from the CVM", file=sys.stderr)
    return code


def _log_tailers(flow_datastore, identity) -> tuple:
    """Metaflow's tailers of the attempt's stdout and stderr where the task saves them (as ``@kubernetes``
    shows a pod's output)."""
    from metaflow.mflog import TASK_LOG_SOURCE, get_log_tailer

    ds = flow_datastore.get_task_datastore(
        mode="w", run_id=identity.run, step_name=identity.step, task_id=identity.task, attempt=identity.attempt
    )
    return tuple(
        get_log_tailer(ds.get_log_location(TASK_LOG_SOURCE, s), flow_datastore.TYPE) for s in ("stdout", "stderr")
    )
