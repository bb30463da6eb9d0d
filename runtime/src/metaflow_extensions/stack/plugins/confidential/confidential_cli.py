"""``confidential step``: the trampoline Metaflow's runtime launches for a ``@confidential`` task.

It rebuilds the real step command from its own options (as Metaflow's
``kubernetes step`` does), has ``metaflow_stack.confidential.launcher``
prepare the step's enclave (once per code and settings), order the task
into it and judge its evidence, records the verification in the task's
metadata, and exits with the task's code; 202 (Metaflow's "do not retry")
when the enclave cannot be made or the evidence is refused.
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
@click.option("--mode", default="direct")
@click.option("--policy", default=None)
@click.option("--enclave-size", default="4G")
@click.option("--threads", type=int, default=32)
@click.option("--collateral", default=None)
@click.option("--pccs-url", default=None)
@click.option("--isv-prod-id", type=int, default=0)
@click.option("--isv-svn", type=int, default=0)
@click.option("--trust", default="")
@click.pass_context
def step(
    ctx,
    step_name: str,
    code_package_metadata: str,
    code_package_sha: str,
    code_package_url: str,
    mode: str,
    policy: str | None,
    enclave_size: str,
    threads: int,
    collateral: str | None,
    pccs_url: str | None,
    isv_prod_id: int,
    isv_svn: int,
    trust: str,
    **kwargs,
) -> None:
    from metaflow.metadata_provider import MetaDatum

    from metaflow_stack import code_package, settings
    from metaflow_stack.confidential import launcher
    from metaflow_stack.confidential.attest import TaskIdentity
    from metaflow_stack.confidential.keyring import KeeperUnavailable
    from metaflow_stack.datastore import CONFIDENTIAL_FIELD
    from metaflow_stack.trampolines import exits_in_one_line, step_command

    flow_datastore, flow_name = ctx.obj.flow_datastore, ctx.obj.flow.name
    run_id, task_id, attempt = kwargs["run_id"], kwargs["task_id"], int(kwargs["retry_count"])
    command, env = step_command(ctx, step_name, kwargs)
    pathspec = f"{flow_name}/{run_id}/{step_name}/{task_id}"
    with exits_in_one_line(f"{pathspec}: stopped; its enclave was stopped"):
        stack = settings.load()
        state_dir = stack.state_dir
        chosen = launcher.Settings(
            mode, enclave_size, threads, policy, collateral, pccs_url, isv_prod_id, isv_svn, tuple(trust.split())
        )  # fmt: skip
        code = code_package.unpacked_here(flow_datastore, code_package_url, code_package_sha)
        if flow_datastore.TYPE == "local":
            datastore = flow_datastore._storage_impl.datastore_root
        else:  # the task reaches its datastore over the network: an empty folder stands in, never the code
            datastore = str(state_dir / "confidential" / "no-local-datastore")
            os.makedirs(datastore, exist_ok=True)
        code_env = {
            "METAFLOW_CODE_METADATA": code_package_metadata,
            "METAFLOW_CODE_SHA": code_package_sha,
            "METAFLOW_CODE_URL": code_package_url,
            "METAFLOW_CODE_DS": flow_datastore.TYPE,
        }
        keeper = launcher.keeper(state_dir, chosen, stack.key_release_url)
        try:
            keeper_key = keeper.public_key()
        except KeeperUnavailable as exc:  # nothing was judged: this attempt may be retried
            print(f"error: {exc.message}\nfix: {exc.fix}", file=sys.stderr, flush=True)
            sys.exit(1)
        prepared = launcher.enclave(code, datastore, chosen, state_dir, code_env, keeper_key)
        identity = TaskIdentity(
            flow=flow_name, run=run_id, step=step_name, task=task_id, attempt=attempt, code_digest=code_package_sha
        )

        def record(verification: dict) -> None:
            found = {**verification, "mr_enclave": prepared.mr_enclave}
            datum = MetaDatum(field=CONFIDENTIAL_FIELD, value=json.dumps(found),
                              type=CONFIDENTIAL_FIELD, tags=[f"attempt_id:{attempt}"])  # fmt: skip
            ctx.obj.metadata.register_metadata(run_id, step_name, task_id, [datum])

        code = launcher.run_task(prepared, identity, command, env, chosen, keeper, record)
    sys.exit(code)
