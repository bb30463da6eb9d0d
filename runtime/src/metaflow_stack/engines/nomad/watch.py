"""One task's job followed to its end: placed (or why not, at once), its logs as they are written, its
real exit code.

Everything waits on Nomad's blocking queries: the evaluation until it is
done, the job's allocations until one exists, the allocation until it
ends. A job Nomad cannot place leaves an evaluation whose
``FailedTGAllocs`` say why (no node with the memory, a constraint that
filtered every node, no such device): that is reported in seconds, in
Nomad's own words, rather than waiting for a node that will not come.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metaflow_stack.engines.nomad.client import NomadClient, NotFound, Unavailable
from metaflow_stack.engines.nomad.jobspec import TASK
from metaflow_stack.engines.nomad.logs import FrameDecoder, Lines, skipped
from metaflow_stack.errors import StackError

#: An allocation's ends (``ClientStatus``).
ENDED = ("complete", "failed", "lost")
#: After the allocation ends: how long its logs may take to be read to their end.
DRAIN_S = 15.0
#: Said where a log's files were rotated out before they were read (the task's saved logs are whole).
LOST_FILES = "part of this log was rotated out by Nomad before it was read (the job's LogConfig.MaxFiles)"
#: What the exit code is when the task never got to run its command (image pull, driver, validation).
NOT_STARTED = ("Driver Failure", "Setup Failure", "Failed Validation", "Failed Artifact Download")


class Unplaced(StackError):
    """Nomad placed no allocation for the job: no node fits."""


@dataclass(frozen=True)
class Ending:
    """How the task ended: its exit code (``None``: its command never ran), signal, and Nomad's words."""

    code: int | None
    signal: int = 0
    status: str = "complete"
    reason: str = ""


def why_unplaced(failed: dict[str, Any]) -> str:
    """Nomad's placement metrics (``FailedTGAllocs``: a group's ``AllocationMetric``) in one line."""
    parts = []
    for metric in failed.values():
        parts.append(f"{metric.get('NodesEvaluated', 0)} nodes evaluated")
        for key, label in (("ConstraintFiltered", "filtered by"), ("DimensionExhausted", "exhausted")):
            for what, count in sorted((metric.get(key) or {}).items()):
                parts.append(f"{label} {what} ({count})")
        if metric.get("NodesAvailable") == {} or not metric.get("NodesEvaluated"):
            parts.append("no node in the job's datacenters and node pool")
    return "; ".join(parts)


def wait_placed(client: NomadClient, eval_id: str, say: Callable[[str], None]) -> None:
    """Wait for the evaluation of a registered job. ``Unplaced`` if no node could ever take it (every node
    filtered out: a constraint, a device or driver no node has; or no node in its datacenters and pool);
    a job only waiting for room (nodes busy: ``DimensionExhausted``) is left to Nomad's blocked
    evaluation, which places it when room frees, and ``say`` tells why it waits."""
    index = 0
    while True:
        evaluation, index = client.evaluation(eval_id, index)
        status, failed = evaluation.get("Status"), evaluation.get("FailedTGAllocs")
        if failed:
            reason = why_unplaced(failed)
            if any(_never(metric) for metric in failed.values()):
                raise Unplaced(
                    f"Nomad cannot place the job: {reason}",
                    fix="ask for what a node has (cpu, memory and gpu: @nomad's or @resources'; @nomad's "
                    "constraints, datacenters, node_pool)",
                )
            beyond = beyond_every_node(client, evaluation.get("JobID", ""))
            if beyond:
                raise Unplaced(
                    f"Nomad cannot place the job: no node could ever hold it ({beyond}; {reason})",
                    fix="ask for what a node has (cpu, memory and gpu: @nomad's or @resources')",
                )
            say(f"queued: no Nomad node has room for the job now ({reason}); it starts when one has")
            return
        if status == "complete":
            return
        if status in ("failed", "canceled"):
            raise StackError(
                f"Nomad's evaluation of the job {status}: {evaluation.get('StatusDescription', '')}",
                fix="read the evaluation (nomad eval status) and the servers' log",
            )


def _never(metric: dict[str, Any]) -> bool:
    """Whether no node could ever take the group: none evaluated, or every one evaluated filtered out."""
    evaluated = metric.get("NodesEvaluated") or 0
    return not evaluated or (metric.get("NodesFiltered") or 0) >= evaluated


def beyond_every_node(client: NomadClient, job_id: str) -> str | None:
    """What the job's task asks for beyond every node's whole capacity (less what each node reserves), so
    that no node could hold it however long it waited: Nomad reports that, like a busy cluster, as
    ``DimensionExhausted``. None where some node could, or where the nodes' resources cannot be read (a token
    without ``node:read``): the job then waits, as Nomad has it."""
    try:
        tasks = [task for group in client.job(job_id).get("TaskGroups") or [] for task in group.get("Tasks") or []]
        nodes = [node for node in client.nodes(resources=True) if node.get("NodeResources")]
    except StackError:
        return None
    if not nodes or not tasks:
        return None
    asked = _asked(tasks[0].get("Resources") or {})
    held = [_holds(node, asked) for node in nodes]
    if any(all(held_here[what] >= amount for what, amount in asked.items()) for held_here in held):
        return None
    most = {what: max(held_here[what] for held_here in held) for what in asked}
    short = [f"{what}: asks {n}, the most a node has is {most[what]}" for what, n in asked.items() if n > most[what]]
    return "; ".join(short) or "no one node has all it asks for"


def _asked(resources: dict[str, Any]) -> dict[str, int]:
    """A task's ``Resources`` by what a node has: MHz, MB, whole cores, devices by name (``nvidia/gpu``)."""
    asked = {"memory MB": int(resources.get("MemoryMB") or 0), "CPU MHz": int(resources.get("CPU") or 0)}
    asked["cores"] = int(resources.get("Cores") or 0)
    for device in resources.get("Devices") or []:
        asked[f"{device['Name']} devices"] = int(device.get("Count") or 1)
    return {what: amount for what, amount in asked.items() if amount}


def _holds(node: dict[str, Any], asked: dict[str, int]) -> dict[str, int]:
    """What ``node`` could give one task of all it has, for each kind of thing ``asked`` names (a device by
    ``vendor/type``, ``type`` or ``vendor/type/name``, as Nomad matches a device request)."""
    whole, reserved = node["NodeResources"], node.get("ReservedResources") or {}
    cpu = whole.get("Cpu") or {}
    held = {
        "memory MB": (whole.get("Memory") or {}).get("MemoryMB", 0) - (reserved.get("Memory") or {}).get("MemoryMB", 0),
        "CPU MHz": cpu.get("CpuShares", 0) - (reserved.get("Cpu") or {}).get("CpuShares", 0),
        "cores": len(cpu["ReservableCpuCores"]) if cpu.get("ReservableCpuCores") else cpu.get("TotalCpuCores", 0),
    }
    for what in asked:
        if what.endswith(" devices"):
            name = what.removesuffix(" devices")
            held[what] = sum(
                sum(1 for instance in group.get("Instances") or [] if instance.get("Healthy", True))
                for group in whole.get("Devices") or []
                if name in _device_names(group)
            )
    return held


def _device_names(group: dict[str, Any]) -> set[str]:
    """The names a device request may give a node's device group by."""
    vendor, kind, name = group.get("Vendor", ""), group.get("Type", ""), group.get("Name", "")
    return {kind, f"{vendor}/{kind}", f"{vendor}/{kind}/{name}"}


def allocation_of(client: NomadClient, job: str) -> str:
    """The ID of the job's allocation, once Nomad made it."""
    index = 0
    while True:
        allocations, index = client.allocations(job, index)
        if allocations:
            return max(allocations, key=lambda a: a.get("CreateIndex", 0))["ID"]


def ending(allocation: dict[str, Any]) -> Ending:
    """The real exit code of a finished allocation's task (its ``Terminated`` event), or why it has none."""
    status = allocation.get("ClientStatus", "")
    events = (allocation.get("TaskStates") or {}).get(TASK, {}).get("Events") or []
    for event in reversed(events):
        if event.get("Type") == "Terminated":
            return Ending(int(event.get("ExitCode", 0)), int(event.get("Signal", 0)), status)
    said = [
        e.get("DisplayMessage") or e.get("DriverError") or e.get("Message")
        for e in events
        if e.get("Type") in NOT_STARTED
    ]
    if said:
        return Ending(None, status=status, reason=str(said[-1]))
    if status == "lost":
        return Ending(None, status=status, reason="the node running it was lost")
    return Ending(None, status=status, reason=allocation.get("ClientDescription", "") or status)


def last_lines(client: NomadClient, alloc_id: str, kind: str, count: int = 20) -> list[str]:
    """The last ``count`` lines the task's ``kind`` log holds now (read to its end, not followed); none
    before the task has started."""
    lines, decoder, kept = Lines(), FrameDecoder(), collections.deque(maxlen=count)
    try:
        with client.logs(alloc_id, TASK, kind, follow=False) as chunks:
            for chunk in chunks:
                for frame in decoder.feed(chunk):
                    kept.extend(lines.feed(frame.data))
    except NotFound:
        return []
    kept.extend(lines.flush())
    return list(kept)


class LogFollower(threading.Thread):
    """Reads one of the task's logs (``kind``: ``stdout``, ``stderr``) as it is written and hands over each
    line. Nomad has no log before the task starts (404): it asks again until there is one; a stream that
    drops is resumed where it was (the bytes read: Nomad counts an offset across the files it still keeps,
    so after files were rotated out a resumed read starts further on); once the allocation has ended
    (``ended``) it reads what is left, not
    followed, and stops. A file rotated out while it was read ends with a ``file deleted`` frame and Nomad
    goes on with the next file in the same stream (``client/fs_endpoint.go``), so that frame ends nothing
    here: the bytes of a file deleted before they were read are lost, as with ``nomad alloc logs -f``."""

    def __init__(self, client: NomadClient, alloc_id: str, kind: str, on_line: Callable[[str, str], None]) -> None:
        super().__init__(name=f"nomad-{kind}", daemon=True)
        self.client, self.alloc_id, self.kind, self.on_line = client, alloc_id, kind, on_line
        self.ended = threading.Event()  # set by the watcher when the allocation ends
        self.error: Exception | None = None

    def run(self) -> None:
        lines, received, pause, file = Lines(), 0, 0.2, ""
        try:
            while True:
                # Once the allocation has ended, one last read, not followed: Nomad sends heartbeats whatever is
                # still on its way (its log collector, file watcher and framer each hold bytes a while), and
                # answers a read that is not followed with all there is, then ends it.
                final, caught_up = self.ended.is_set(), False
                decoder = FrameDecoder()
                try:
                    with self.client.logs(self.alloc_id, TASK, self.kind, offset=received, follow=not final) as chunks:
                        self.error = None
                        for chunk in chunks:
                            for frame in decoder.feed(chunk):
                                received += len(frame.data)
                                if frame.data and file and skipped(file, frame.file):  # (the lost part ends a line)
                                    for line in [*lines.flush(), f"({self.kind}: {LOST_FILES})"]:
                                        self.on_line(self.kind, line)
                                file = frame.file or file
                                for line in lines.feed(frame.data):
                                    self.on_line(self.kind, line)
                                caught_up = caught_up or (frame.heartbeat and self.ended.is_set())
                            if caught_up:
                                break
                except (NotFound, Unavailable) as exc:  # not there yet, or the stream dropped: again
                    self.error = exc
                if final:
                    return
                if not self.ended.is_set():
                    self.ended.wait(pause)
                    pause = min(pause * 2, 2.0)
        except Exception as exc:  # reported by the watcher: the task's ending matters more than its log
            self.error = exc
        finally:
            for line in lines.flush():
                self.on_line(self.kind, line)


def follow(client: NomadClient, job: str, eval_id: str, on_line: Callable[[str, str], None]) -> Ending:
    """Wait for ``job`` to be placed, hand over its log lines (``on_line(kind, line)``) while it runs, and
    return how it ended. Its logs are read once its task has started (Nomad has none before). An allocation
    Nomad no longer knows ended unseen: the attempt is lost (``@retry`` runs it again)."""
    wait_placed(client, eval_id, lambda said: on_line("stderr", said))
    alloc_id = allocation_of(client, job)
    followers: list[LogFollower] = []
    index, gone = 0, None
    while True:
        try:
            allocation, index = client.allocation(alloc_id, index)
        except NotFound:  # collected before its end was read: a dev agent restarted, an operator's purge and GC
            gone = Ending(None, status="lost", reason=f"Nomad no longer knows its allocation {alloc_id}")
            break
        if not followers and _started(allocation):
            followers = [LogFollower(client, alloc_id, kind, on_line) for kind in ("stdout", "stderr")]
            for follower in followers:
                follower.start()
        if allocation.get("ClientStatus") in ENDED:
            break
    for follower in followers:
        follower.ended.set()
    for follower in followers:
        follower.join(DRAIN_S)
        if follower.error is not None and not isinstance(follower.error, NotFound):
            on_line("stderr", f"(the task's {follower.kind} could not be read from Nomad: {follower.error})")
    return gone or ending(allocation)


def _started(allocation: dict[str, Any]) -> bool:
    """Whether the task has started (its logs exist), or ended without starting (they never will)."""
    state = (allocation.get("TaskStates") or {}).get(TASK) or {}
    started = str(state.get("StartedAt") or "")
    if started and not started.startswith("0001-"):  # (Nomad writes Go's zero time before the task starts)
        return True
    return any(e.get("Type") == "Started" for e in state.get("Events") or [])
