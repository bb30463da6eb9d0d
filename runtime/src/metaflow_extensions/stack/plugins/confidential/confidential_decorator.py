"""``@confidential``: run a step's tasks in a TEE, and trust their results only after attestation.

Follows Metaflow's compute-decorator contract, as ``@devcontainer`` does:
the runtime launches each task as ``confidential step ...`` (the trampoline
in ``confidential_cli``), which prepares the step's enclave, orders the task
into it, judges its evidence before the step's code runs, and exits with
the task's code, so ``@retry``, ``@catch``, ``@timeout`` and foreach work
unchanged. Inside the enclave this decorator makes the evidence (and, with
``seal``, receives the run's data key) before the step runs, and seals the
step's artifacts after it.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, ClassVar

from metaflow.decorators import StepDecorator
from metaflow.exception import MetaflowException

from metaflow_stack.confidential import PLATFORM
from metaflow_stack.trampolines import Trampolined

#: Where a step's tasks may run, and the TEE modes of each (the first: the default).
BACKENDS = {"gramine": ("direct", "sgx"), "phala": ("tdx",)}
#: Other compute decorators: a step runs in one place.
ELSEWHERE = ("kubernetes", "batch", "nomad", "devcontainer", "worker_pool")


class ConfidentialException(MetaflowException):
    headline = "@confidential"


def _inside() -> bool:
    """Whether this process is a confidential task's TEE: its keeper's key is fixed there (manifest, compose)."""
    from metaflow_stack.confidential import KEEPER_KEY

    return bool(os.environ.get(KEEPER_KEY))


class ConfidentialDecorator(Trampolined, StepDecorator):
    """Run this step in a Trusted Execution Environment.

    backend: "gramine" (an SGX enclave under Gramine, on this machine) or "phala" (a TDX confidential VM on
    Phala Cloud: PHALA_CLOUD_API_KEY, a pinned KMS in METAFLOW_STACK_PHALA_KMS_SIGNER, a datastore it reaches
    such as S3; image: the stack's ``confidential`` image pushed to METAFLOW_STACK_REGISTRY unless given;
    instance_type: Phala's, "tdx.small"). container, Gramine's: run the enclave in the step's own image under
    Docker (GSC-style: the stack's gramine image with the code package and the manifest prepared and signed
    at build), not with this machine's Gramine. mode, Gramine's: "direct" (``gramine-direct``: the enclave's
    configuration as an ordinary process, no SGX, no protection, for development) or "sgx" (``gramine-sgx``:
    the results trusted only after the enclave's quote passes ``policy``); a Phala CVM is "tdx". policy: a TOML
    file (relative to the flow's file) of the measurements and platform states allowed; with a key-release
    service (STACK_KEY_RELEASE_URL), the service's own policy of that file's name ("prod" for
    "policies/prod.toml") is the one applied. seal: encrypt the
    step's artifacts with a key released only to the attested enclave. enclave_size ("4G") and threads:
    the enclave's memory and threads. collateral: a file of DCAP collateral (else fetched from pccs_url,
    default METAFLOW_STACK_PCCS_URL or Phala's public PCCS). isv_prod_id and isv_svn: the enclave's product
    and version, signed into it (a policy's isv_prod_id and min_isv_svn hold it to them). trust: the
    classes, by full name, the enclave may unpickle from inputs made outside a TEE (a model trained in an
    ordinary step); otherwise only plain data, sealed values and numpy arrays are read in (a crafted pickle
    would run in the enclave).
    """

    name = "confidential"
    defaults: ClassVar[dict[str, Any]] = {
        "backend": "gramine",
        "mode": None,
        "policy": None,
        "seal": True,
        "enclave_size": "4G",
        "threads": 32,
        "collateral": None,
        "pccs_url": None,
        "isv_prod_id": 0,
        "isv_svn": 0,
        "trust": (),
        "image": None,
        "instance_type": "tdx.small",
        "container": False,
    }
    #: Metaflow's environments (``--environment pypi|conda``) solve a step for where it runs, as for
    #: ``@kubernetes``: every TEE here is Linux on x86-64.
    supports_conda_environment: ClassVar[bool] = True
    target_platform: ClassVar[str] = PLATFORM
    #: The stack's task image of Phala CVMs, pushed once per run.
    stack_image: ClassVar[str | None] = None
    #: Whether this run's start has deleted the CVMs of launchers killed outright (once per run).
    swept: ClassVar[bool] = False
    #: The image Gramine steps' own images build FROM, resolved once per run (with the run's start removing
    #: the task containers of launchers killed outright).
    gramine_image: ClassVar[str | None] = None

    def step_init(self, flow, graph, step, decos, environment, flow_datastore, logger) -> None:
        self.flow_datastore, self.step, self.decos = flow_datastore, step, decos
        if _inside():  # in the enclave: the run's start checked everything; inputs are not read yet
            from metaflow_extensions.stack.plugins.confidential.input_guard import check_guarding
            from metaflow_stack.confidential.input_records import install

            check_guarding()
            install()  # every blob and included file it reads held to its digest
            return
        from metaflow.plugins.timeout_decorator import get_run_time_limit_for_task

        from metaflow_stack.elsewhere import foreach_body
        from metaflow_stack.errors import StackError

        self.run_time_limit = get_run_time_limit_for_task(decos)  # a CVM's, once booted (as a pod's deadline)
        others = [
            d.name
            for d in decos
            if d.name in ELSEWHERE  # (--with worker_pool leaves a step that runs no foreach's items alone)
            and not (d.name == "worker_pool" and not d.statically_defined and not foreach_body(graph, step))
        ]
        if others:
            raise ConfidentialException(f"step {step}: @confidential cannot be combined with @{others[0]}")
        try:
            self._check(flow, Path(sys.modules[flow.__module__].__file__).parent, environment, decos)
            if self.attributes["backend"] == "phala":
                self._check_phala(flow_datastore)
        except StackError as exc:
            raise ConfidentialException(f"step {step}: {exc}") from None

    def _check(self, flow, flow_dir: Path, environment, decos) -> None:
        from metaflow_stack import settings
        from metaflow_stack.confidential import gramine
        from metaflow_stack.confidential.inputs import check_trust
        from metaflow_stack.confidential.keyring import POLICY_NAME, policy_name
        from metaflow_stack.confidential.manifest import enclave_bytes
        from metaflow_stack.confidential.policy import load_policy
        from metaflow_stack.errors import InvalidInput

        backend = self.attributes["backend"]
        if backend not in BACKENDS:
            raise InvalidInput("backend", f"{backend!r} is not one of {', '.join(BACKENDS)}", fix='backend="gramine"')
        modes = BACKENDS[backend]
        mode = self.attributes["mode"] = self.attributes["mode"] or modes[0]
        if mode not in modes:
            fix = "leave mode out" if len(modes) == 1 else f'mode="{modes[0]}"'
            raise InvalidInput("mode", f"{mode!r} is not one of {backend}'s: {', '.join(modes)}", fix=fix)
        enclave_bytes(str(self.attributes["enclave_size"]))
        threads = self.attributes["threads"]
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 4096:
            raise InvalidInput("threads", f"{threads!r} is not a number of threads from 1 to 4096", fix="threads=32")
        trust = self.attributes["trust"]
        try:
            self.attributes["trust"] = check_trust([trust] if isinstance(trust, str) else list(trust))
        except (TypeError, ValueError) as exc:
            fix = 'trust=["sklearn.linear_model._logistic.LogisticRegression"] (the names a refusal gives)'
            raise InvalidInput("trust", str(exc), fix=fix) from None
        for name in ("isv_prod_id", "isv_svn"):
            value = self.attributes[name]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
                raise InvalidInput(name, f"{value!r} is not a number from 0 to 65535", fix=f"{name}=1")
        policy = self.attributes["policy"]
        if policy is not None and not isinstance(policy, str):
            raise InvalidInput("policy", f"{policy!r} is not a policy file's path", fix='policy="policies/prod.toml"')
        if policy is not None and settings.load().key_release_url:
            # The key-release service holds its own copy under the file's name: this machine need not have it.
            if not re.match(POLICY_NAME, policy_name(policy)):
                raise InvalidInput("policy", f"{policy!r} does not name a policy file", fix='policy="prod"')
        elif policy is not None:
            self.attributes["policy"] = str((flow_dir / policy).resolve())
            load_policy(self.attributes["policy"])  # refused now, naming the field, not at the first task
        elif mode != "direct":
            raise InvalidInput("policy", f"is needed to trust a TEE of mode {mode}", fix='policy="policies/prod.toml"')
        container = self.attributes["container"]
        if not isinstance(container, bool):
            raise InvalidInput("container", f"{container!r} is not True or False", fix="container=True")
        if container and backend != "gramine":
            raise InvalidInput("container", f"is Gramine's: a {backend} task runs in its own TEE", fix="leave it out")
        self._check_environment(flow, environment, decos)
        if container:  # the step's own image brings Gramine: this machine needs only Docker
            from metaflow_stack.engines.docker import require_engine

            require_engine()
        elif backend == "gramine":
            gramine.tool("gramine-manifest")
            gramine.tool("gramine-direct" if mode == "direct" else "gramine-sgx")

    def _check_environment(self, flow, environment, decos) -> None:
        """The step's own environment (Metaflow's ``--environment pypi``) goes into the step's image, where the
        image can hold it: its ``@pypi`` packages, on the image's Python. Anywhere else the task would run
        the TEE's interpreter without it (this machine's Gramine, a CVM's image), so that is refused."""
        from metaflow_stack import settings
        from metaflow_stack.errors import StackError
        from metaflow_stack.solved_environment import conda_packages, has_own, requested_python

        if not has_own(environment, decos):
            return
        if self.attributes["backend"] == "phala":
            raise StackError(
                f"its {environment.TYPE} environment would not be in its CVM, which runs its image's Python",
                fix="@pypi(disabled=True), and image= an image with the step's packages",
            )
        if not self.attributes["container"]:
            raise StackError(
                f"its {environment.TYPE} environment would not be in the enclave, which runs this machine's "
                "Gramine with the runtime's own interpreter",
                fix="container=True to install it in the step's image, or @pypi(disabled=True)",
            )
        if named := conda_packages(flow, decos):
            raise StackError(
                f"its conda packages ({', '.join(named)}) cannot go into its image yet", fix="use @pypi for them"
            )
        python = requested_python(flow, decos)
        if python and python != settings.IMAGE_PYTHON and not settings.load().gramine_image:
            raise StackError(
                f"its @pypi environment is for Python {python}, and its image's Python is {settings.IMAGE_PYTHON}",
                fix=f'@pypi(python="{settings.IMAGE_PYTHON}") (or @pypi_base)',
            )

    def _check_phala(self, flow_datastore) -> None:
        """What a task on Phala Cloud needs of this run, refused before it starts: a datastore the CVM reaches
        (it shares nothing else with this machine) and an API key."""
        from metaflow_stack.confidential.phala import KEY_FIX, PhalaError
        from metaflow_stack.errors import InvalidInput, StackError

        if flow_datastore.TYPE == "local":
            raise StackError(
                "a Phala CVM reaches the run's datastore over the network, not this machine's folder",
                fix="run with --datastore s3 (and a bucket the CVM reaches)",
            )
        if not os.environ.get("PHALA_CLOUD_API_KEY"):
            raise PhalaError("PHALA_CLOUD_API_KEY is not set", fix=KEY_FIX)
        image = self.attributes["image"]
        if image is not None and "@sha256:" not in str(image):  # the compose pins what it names: content, not a tag
            raise InvalidInput("image", f"{image!r} is not named by its digest", fix="image='registry/name@sha256:...'")

    def runtime_init(self, flow, graph, package, run_id) -> None:
        from metaflow_stack.errors import StackError

        self.take_over(package)
        cls = type(self)
        if self.attributes["container"] and cls.gramine_image is None:
            from metaflow_stack.confidential.step_image import gramine_image, remove_orphans

            try:
                remove_orphans()
                cls.gramine_image = gramine_image()
            except StackError as exc:
                raise ConfidentialException(f"step {self.step}: {exc}") from None
        if self.attributes["backend"] != "phala":
            return
        if not cls.swept:
            cls.swept = True
            _sweep()
        if self.attributes["image"] is None:
            try:
                if cls.stack_image is None:
                    from metaflow_stack.confidential.cvm import stack_image

                    cls.stack_image = stack_image()
            except StackError as exc:
                raise ConfidentialException(f"step {self.step}: {exc}") from None
            self.attributes["image"] = cls.stack_image

    def runtime_step_cli(self, cli_args, retry_count, max_user_code_retries, ubf_context) -> None:
        if not self.trampoline(cli_args, retry_count, max_user_code_retries, "confidential"):
            return
        options = ("backend", "mode", "policy", "enclave_size", "threads", "collateral", "pccs_url", "isv_prod_id",
                   "isv_svn", "image", "instance_type", "container")  # fmt: skip
        for option in options:
            if self.attributes[option] is not None:
                cli_args.command_options[option.replace("_", "-")] = self.attributes[option]
        if self.attributes["trust"]:
            cli_args.command_options["trust"] = " ".join(self.attributes["trust"])
        if self.attributes["container"]:
            cli_args.command_options["gramine-image"] = type(self).gramine_image
        if self.attributes["backend"] == "phala":
            cli_args.command_options["run-time-limit"] = self.run_time_limit

    def task_pre_step(
        self, step_name, task_datastore, metadata, run_id, task_id, flow, graph, retry_count,
        max_user_code_retries, ubf_context, inputs,
    ) -> None:  # fmt: skip
        if _inside():
            from metaflow_stack.confidential import inside
            from metaflow_stack.confidential.input_records import hold

            hold(inputs or [], inside.order().inputs)  # the records it opened: the ones it was ordered with
            inside.receive()

    def task_post_step(self, step_name, flow, graph, retry_count, max_user_code_retries) -> None:
        self._seal(flow, graph, step_name)

    def task_exception(self, exception, step_name, flow, graph, retry_count, max_user_code_retries) -> bool:
        self._seal(flow, graph, step_name)  # a failed attempt's values are persisted too: sealed as well
        return False

    def _seal(self, flow, graph, step_name: str) -> None:
        """Seal every artifact the step persists, an input it read included (read inside, it may have been
        used or changed there), unless it already is; not Metaflow's own (``_`` names, which it keeps
        itself) nor the foreach list a split step hands Metaflow to divide."""
        if not (_inside() and self.attributes["seal"]):
            return
        from metaflow import current

        from metaflow_stack.confidential import inside
        from metaflow_stack.confidential.seal import Sealed

        divided = graph[step_name].foreach_param
        try:
            for name, value in list(flow.__dict__.items()):
                if name.startswith("_") or name in ("name", divided) or isinstance(value, Sealed):
                    continue
                where = f"{current.flow_name}/{current.run_id}/{step_name}/{current.task_id}/{name}"
                setattr(flow, name, inside.sealed(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), where))
        except BaseException:
            # Fail closed: Metaflow persists what the step holds even when it fails, so nothing unsealed stays.
            for name in [n for n, v in flow.__dict__.items() if not n.startswith("_") and not isinstance(v, Sealed)]:
                if name != divided:
                    delattr(flow, name)
            raise


def _sweep() -> None:
    """Delete the CVMs whose launcher on this machine was killed outright (``confidential.ledger``), saying so;
    an API that does not answer now is left to the first task to report."""
    from metaflow_stack import settings
    from metaflow_stack.confidential.ledger import Ledger
    from metaflow_stack.confidential.phala import PhalaCloud

    cloud = PhalaCloud()
    try:
        swept, left = Ledger(settings.load().state_dir).sweep(cloud)
    finally:
        cloud.close()
    if swept:
        print(f"deleted CVM(s) {', '.join(swept)}: their launchers were killed outright", file=sys.stderr)
    if left:
        print(f"could not delete CVM(s) {', '.join(left)}, whose launchers were killed outright: the next run's "
              "start tries again, or delete them in Phala Cloud's dashboard", file=sys.stderr)  # fmt: skip
