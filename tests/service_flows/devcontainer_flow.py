"""A foreach whose items run in @devcontainer sandboxes: item 2 fails its first attempt (so @retry
runs it again in a new container), ``--fail-item N`` makes item N fail for good (at once), ``--sleep S``
keeps every other item busy (a test kills the run meanwhile). Each item records what it saw inside."""

import os
import socket
import time
from pathlib import Path

from metaflow import FlowSpec, Parameter, current, devcontainer, environment, retry, step


def _memory_limit() -> str:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        if Path(path).exists():
            return Path(path).read_text().strip()
    return "unknown"


def _network() -> str:
    """ "none" when no route leaves the container (only a loopback), else "routed"."""
    try:
        socket.create_connection(("192.0.2.1", 80), timeout=1).close()  # TEST-NET: never answers
    except OSError as exc:
        return "none" if "unreachable" in str(exc).lower() else "routed"
    return "routed"


def _writes(root, flow):
    """Whether a file can be made in ``flow``'s folder of the datastore at ``root``."""
    try:
        folder = os.path.join(root, flow, "probes")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{current.task_id}-{current.retry_count}"), "w"):
            return True
    except OSError:
        return False


class DevcontainerFlow(FlowSpec):
    fail_item = Parameter("fail-item", default=0, type=int)
    sleep = Parameter("sleep", default=0.0, type=float)

    @step
    def start(self):
        self.items = [1, 2, 3]
        self.next(self.each, foreach="items")

    @environment(vars={"STEP_SETTING": "set by @environment"})
    @retry(times=1)
    @devcontainer(cpu=1, memory="512m")
    @step
    def each(self):
        self.in_container = os.path.exists("/.dockerenv")
        self.hostname = socket.gethostname()
        self.uid = os.getuid()
        self.memory_limit = _memory_limit()
        self.network = _network()
        self.root_writable = os.access("/", os.W_OK)
        self.host_variable_seen = "STACK_TEST_HOST_SECRET" in os.environ  # the run's, not the step's
        self.step_setting = os.environ.get("STEP_SETTING")  # the step's own
        self.folder_writable = os.access(os.getcwd(), os.W_OK)
        # The local datastore (local metadata's root: the same here): its own flow's folder, not another's.
        stores = os.path.join(os.environ.get("METAFLOW_DATASTORE_SYSROOT_LOCAL", "/nowhere"), ".metaflow")
        self.stores_written = {"own": _writes(stores, current.flow_name), "other": _writes(stores, "OtherFlow")}
        time.sleep(0 if self.input == self.fail_item else self.sleep)
        print(f"item {self.input} in {self.hostname}")
        if self.input == 2 and current.retry_count == 0:
            raise RuntimeError("item 2 fails its first attempt")
        if self.input == self.fail_item:
            raise ValueError(f"item {self.input} always fails")
        self.value = self.input * 10
        self.next(self.join)

    @step
    def join(self, inputs):
        self.values = sorted(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    DevcontainerFlow()
