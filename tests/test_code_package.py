"""The machine's cache of unpacked code packages: made once, pruned beyond ``KEEP``, and never pruned while
a live process holds one (a run whose pool imports from it, a task whose container mounts it)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from metaflow_stack import code_package
from metaflow_stack.code_package import KEEP

#: Unpacks the packages named on its command line (each a module of its own) into the cache at argv[1],
#: then, with --hold, says so and waits for its input to close.
UNPACK = """
import io, sys, tarfile
from pathlib import Path
from metaflow_stack.code_package import unpacked

def archive(name):
    out, body = io.BytesIO(), f"NAME = {name!r}\\n".encode()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"{name}.py")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    return out.getvalue()

cache, names = Path(sys.argv[1]), [n for n in sys.argv[2:] if n != "--hold"]
for name in names:
    unpacked(name, lambda: archive(name), cache)
if "--hold" in sys.argv:
    print("holding", flush=True)
    sys.stdin.read()
"""


def unpack(cache: Path, *names: str) -> None:
    subprocess.run([sys.executable, "-c", UNPACK, str(cache), *names], check=True, timeout=60)


def present(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")}


def test_a_package_is_unpacked_and_compiled_once(tmp_path: Path) -> None:
    asked: list[int] = []

    def archive() -> bytes:
        asked.append(1)
        folder = tmp_path / "src"
        folder.mkdir()
        (folder / "mod.py").write_text("X = 1\n")
        subprocess.run(["tar", "-czf", str(tmp_path / "p.tgz"), "-C", str(folder), "mod.py"], check=True)
        return (tmp_path / "p.tgz").read_bytes()

    first = code_package.unpacked("p" * 40, archive, tmp_path / "cache")
    again = code_package.unpacked("p" * 40, archive, tmp_path / "cache")
    assert first == again and asked == [1]
    assert (first / "mod.py").read_text() == "X = 1\n"
    assert list((first / "__pycache__").glob("mod.*.pyc"))


def test_pruning_spares_a_package_a_live_process_holds_until_it_ends(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    holder = subprocess.Popen(
        [sys.executable, "-c", UNPACK, str(cache), "held", "--hold"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        newer = [f"p{i:02d}" for i in range(KEEP + 1)]
        unpack(cache, *newer)  # (held by that process while it ran: nothing of its own pruned)
        unpack(cache, "newest")  # the oldest beyond KEEP: "held" (held), p00 and p01 (no longer held)
        assert present(cache) == {"held", *newer[2:], "newest"}
        assert not (cache / "p00.lock").exists() and not (cache / "p01.lock").exists()
        assert (cache / "held" / "held.py").is_file()
    finally:
        holder.send_signal(signal.SIGKILL)  # however it ends, its hold ends with it
        holder.wait(timeout=30)
    unpack(cache, "last")
    assert "held" not in present(cache) and not (cache / "held.lock").exists()
    assert len(present(cache)) == KEEP


def test_a_package_changed_in_the_datastore_since_the_run_saved_it_is_refused(tmp_path: Path) -> None:
    """The datastore names a package by its content's hash, but neither Metaflow nor the datastore checks it
    as the package is read: a task of any flow sharing the datastore (a sandboxed step among them) could
    have rewritten it, and a later task would unpack and run that as the run's code."""
    import pytest
    from metaflow.datastore import FlowDataStore
    from metaflow.plugins.datastores.local_storage import LocalStorage

    from metaflow_stack.errors import StackError

    store = FlowDataStore("PackagedFlow", None, storage_impl=LocalStorage, ds_root=str(tmp_path))
    blob = b"the run's package"  # (read as bytes: what they hold is the unpacking's business)
    [(url, sha)] = store.save_data([blob], len_hint=1)
    assert code_package.package_bytes(store, url, sha) == blob
    Path(url).write_bytes(b"someone else's code")
    with pytest.raises(StackError) as refused:
        code_package.package_bytes(store, url, sha)
    assert refused.value.message == f"the code package {url} is not the one the run saved: its content changed since"
