"""Run the function in Ray actors, in its captured environment, with real resource requests.

Each replica is an actor created with ``num_cpus``, ``num_gpus`` and
``memory`` as asked. When the function's environment differs from the
caller's, the actors run the recreated environment's interpreter through
Ray's ``py_executable`` runtime environment (that environment must hold the
same Ray version, as any environment captured from a Ray user does). The
runtime reaches the actors on ``PYTHONPATH``, as it does local workers.
Connects to ``RAY_ADDRESS`` when set, else starts a local Ray. A call that
outlasts ``call_timeout`` per input kills its actor (Ray cannot stop a
running actor method otherwise), and a new one takes its place, as it does
for an actor that died.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import sys
import threading
from typing import Any

from metaflow_stack import ray_start
from metaflow_stack.errors import StackError
from metaflow_stack.functions import codecs, environment, loader, protocol
from metaflow_stack.functions.backends import call_bound
from metaflow_stack.functions.errors import CallTimeoutError, FunctionError, WorkerCrashedError
from metaflow_stack.functions.reference import FunctionReference


class FunctionActor:
    """Loads the function once; answers encoded calls (the same payloads as local workers)."""

    def __init__(self, reference_json: str, base: str | None, codec: str, preload: bool = False) -> None:
        from metaflow_stack.functions import reference

        ref = reference.parse(reference_json)
        self._fn, self._params = loader.load(ref, base, preload)
        self._in = codecs.create(codec, ref.input_schema)
        self._out = codecs.create(codec, ref.output_schema)

    def _answer(self, compute: Any) -> tuple[int, bytes]:
        try:
            return protocol.OK, compute()
        except Exception as exc:
            return protocol.RAISED, protocol.error_payload(exc)

    def call(self, payload: bytes) -> tuple[int, bytes]:
        return self._answer(lambda: self._out.encode(self._fn(self._in.decode(payload), self._params)))

    def call_batch(self, payload: bytes) -> tuple[int, bytes]:
        return self._answer(
            lambda: self._out.encode_batch([self._fn(v, self._params) for v in self._in.decode_batch(payload)])
        )

    def describe(self) -> dict[str, Any]:
        """Where this actor runs and what Ray assigned it (for checks and debugging)."""
        import ray

        return {
            "python": sys.executable,
            "pid": os.getpid(),
            "resources": ray.get_runtime_context().get_assigned_resources(),
        }


class RayBackend:
    """A fixed set of actor replicas, each call on an idle one."""

    name = "ray"
    in_process = False

    def __init__(
        self,
        reference: FunctionReference,
        base: str | None,
        codec: str,
        *,
        replicas: int = 1,
        num_cpus: float = 1,
        num_gpus: float = 0,
        memory: int | None = None,
        address: str | None = None,
        start_timeout: float = 300,
        preload: bool = False,
        call_timeout: float | None = None,
    ) -> None:
        try:
            import ray
        except ImportError as exc:
            raise FunctionError("the ray backend needs Ray", fix="pip install 'metaflow-stack[ray]'") from exc
        if replicas < 1:
            raise FunctionError(f"replicas must be at least 1, not {replicas}")
        self._ray = ray
        if not ray.is_initialized():
            try:
                ray_start.init(
                    address=address or os.environ.get("RAY_ADDRESS"),
                    include_dashboard=False,
                    log_to_driver=True,
                    configure_logging=False,
                )
            except StackError as exc:
                raise FunctionError(exc.message, fix=exc.fix) from None
        where = environment.interpreter(reference.environment)
        runtime_env: dict[str, Any] = {}
        if where.pythonpath:  # another environment: its interpreter, with the runtime on its path
            runtime_env = {"py_executable": str(where.python), "env_vars": {"PYTHONPATH": where.pythonpath}}
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": runtime_env}
        if memory is not None:
            options["memory"] = memory
        actor_class = ray.remote(FunctionActor).options(**options)
        self._new_actor = lambda: actor_class.remote(reference.to_json(), base, codec, preload)
        self._actors = [self._new_actor() for _ in range(replicas)]
        self._start_timeout = start_timeout
        self._lock = threading.Lock()  # (guards the list of actors, which replacing and closing change)
        try:
            self.descriptions = ray.get([a.describe.remote() for a in self._actors], timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise FunctionError(
                f"Ray could not start {replicas} actor(s) with {num_cpus} CPU, {num_gpus} GPU each "
                f"within {start_timeout:.0f}s; available: {ray.available_resources()}",
                fix="ask for fewer replicas or resources, or close other functions holding them",
            ) from None
        except ray.exceptions.RayActorError as exc:
            self.close()
            raise FunctionError(f"the function failed to load in its Ray actors: {exc}") from exc
        self._in = codecs.create(codec, reference.input_schema)
        self._out = codecs.create(codec, reference.output_schema)
        self._timeout = call_timeout
        self._turns = itertools.count()
        #: Bounded, each call has an actor to itself (an actor runs one call at a time), so ``call_timeout``
        #: counts only its own run, never a wait behind another call queued on the same actor.
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for actor in self._actors:
            self._idle.put(actor)

    def _take(self) -> Any:
        """The actor for the next call: an idle one when calls are bounded; else the next in turn, calls
        queueing on the actors, Ray sending one while another runs (a fifth more echo calls/s at 4 threads)."""
        if self._timeout is None:
            with self._lock:
                if not self._actors:
                    raise FunctionError("the function was closed", fix="load it again (function_from_json)")
                return self._actors[next(self._turns) % len(self._actors)]
        return self._idle.get()

    def _roundtrip(self, method: str, payload: bytes, inputs: int = 1) -> bytes:
        actor = self._take()
        bound = call_bound(self._timeout, inputs)
        try:
            status, body = self._ray.get(getattr(actor, method).remote(payload), timeout=bound)
        except self._ray.exceptions.GetTimeoutError:
            self._replace(actor)
            raise CallTimeoutError(bound, "Ray actor") from None
        except self._ray.exceptions.RayActorError as exc:
            self._replace(actor)
            raise WorkerCrashedError(
                f"the function's Ray actor died during the call: {exc}",
                fix="the next call runs in a new actor; check the function for crashes (the actor's log says more)",
            ) from None
        except BaseException:
            self._give(actor)
            raise
        self._give(actor)
        if status == protocol.RAISED:
            raise protocol.remote_error(body)
        return body

    def _give(self, actor: Any) -> None:
        """A bounded call's actor, idle again."""
        if self._timeout is not None:
            self._idle.put(actor)

    def _replace(self, actor: Any) -> None:
        """``actor`` killed (Ray cannot stop a running call) and a new one in its place, once: by the first
        call that met it dead or hung (calls queued on it meet it dead too). Unbounded, calls queue on the
        new actor as it starts; bounded, it takes calls once it has started, off this call's path, so its
        start counts in no call's bound."""
        with self._lock:
            if actor not in self._actors:  # (replaced already, or closed)
                return
            new = self._new_actor()
            self._actors[self._actors.index(actor)] = new
        self._ray.kill(actor)
        if self._timeout is not None:
            threading.Thread(target=self._idle_once_started, args=(new,), daemon=True).start()

    def _idle_once_started(self, actor: Any) -> None:
        """``actor`` idle once it answers (within ``start_timeout``; one that does not start fails its first
        call and is replaced in turn)."""
        with contextlib.suppress(self._ray.exceptions.GetTimeoutError, self._ray.exceptions.RayActorError):
            self._ray.get(actor.describe.remote(), timeout=self._start_timeout)
        self._idle.put(actor)

    def call(self, value: Any) -> Any:
        return self._out.decode(self._roundtrip("call", self._in.encode(value)))

    def call_batch(self, values: list[Any]) -> list[Any]:
        return self._out.decode_batch(self._roundtrip("call_batch", self._in.encode_batch(values), len(values)))

    def close(self) -> None:
        with self._lock:
            actors, self._actors = self._actors, []
        for actor in actors:
            self._ray.kill(actor)
