"""What trusting a confidential step costs: quote verification with the policy and the task's binding,
against bare dcap-qvl on the same quote; sealing an artifact per MB, against writing it unsealed; and
reading an input in an enclave through the input guard, against Metaflow's own ``pickle.loads``.

Verification runs on the public SGX and TDX quotes in tests/data/attestation, at a time pinned inside
their collateral's window. ``verify`` is ours: dcap-qvl's verification, then the policy (TCB status,
advisories, debug, measurements) and the ``report_data`` binding. The goal: within 2x of bare dcap-qvl.
Sealing is AES-GCM with a fresh key per artifact, wrapped by the run's data key (``seal``); the peer is
the same bytes copied, which is what an unsealed artifact costs before Metaflow's own gzip and write.

The input guard (``confidential.inputs.guarded_loads``) is Python's pure-Python unpickler with only plain
data, sealed values and trusted packages allowed; the peer is the C unpickler Metaflow uses outside.

    python bench/attest.py [--repeat 2000] [--mb 64]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

PROJECT = Path(__file__).resolve().parents[1]
SAMPLES = PROJECT / "tests" / "data" / "attestation"
PINNED = int(datetime.datetime(2025, 7, 1, tzinfo=datetime.UTC).timestamp())
POLICIES = {
    "sgx_quote": """
[sgx]
mr_enclave = ["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"]
[tcb]
allowed_statuses = ["ConfigurationAndSWHardeningNeeded"]
allowed_advisories = ["INTEL-SA-00289", "INTEL-SA-00615"]
""",
    "tdx_quote": """
[tdx]
mr_td = ["91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7"]
rt_mr3 = ["000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"]
""",
}


def timed(act, repeat: int) -> list[float]:
    """Milliseconds per call, ``repeat`` calls after one warm-up."""
    act()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        act()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def p50_p90(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.9) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--mb", type=int, default=64)
    args = parser.parse_args()
    import dcap_qvl

    from metaflow_stack.confidential.attest import collateral_for, verify
    from metaflow_stack.confidential.policy import parse_policy
    from metaflow_stack.confidential.seal import new_data_key, seal, unseal

    table = Table(title="Quote verification (ms per quote)")
    for column in ("quote", "bare dcap-qvl p50", "ours p50", "ours p90", "ratio"):
        table.add_column(column, justify="left" if column == "quote" else "right")
    for name, text in POLICIES.items():
        quote = (SAMPLES / name).read_bytes()
        collateral = collateral_for(quote, SAMPLES / f"{name}_collateral.json")
        policy, bound = parse_policy(text), bytes(dcap_qvl.parse_quote(quote).report.report_data)
        bare = timed(lambda: dcap_qvl.verify(quote, collateral, PINNED), args.repeat)  # noqa: B023
        ours = timed(lambda: verify(quote, collateral, policy, bound, now=PINNED), args.repeat)  # noqa: B023
        (bare50, _), (ours50, ours90) = p50_p90(bare), p50_p90(ours)
        table.add_row(name, f"{bare50:.3f}", f"{ours50:.3f}", f"{ours90:.3f}", f"{ours50 / bare50:.2f}x")
    Console().print(table)

    value, key, where = os.urandom(args.mb * 1024 * 1024), new_data_key(), "ScoreFlow/1/score/2/predictions"
    sealed = seal(value, key, where)
    rounds = max(3, 2048 // args.mb)
    per_mb = [t / args.mb for t in timed(lambda: seal(value, key, where), rounds)]
    open_mb = [t / args.mb for t in timed(lambda: unseal(sealed, key, where), rounds)]
    copy_mb = [t / args.mb for t in timed(lambda: bytearray(value), rounds)]
    sealing = Table(title=f"Sealing a {args.mb} MiB artifact (ms per MiB)")
    for column in ("path", "p50", "p90"):
        sealing.add_column(column, justify="left" if column == "path" else "right")
    sealing.add_row("seal (AES-256-GCM, fresh key, wrapped)", *(f"{v:.3f}" for v in p50_p90(per_mb)))
    sealing.add_row("unseal", *(f"{v:.3f}" for v in p50_p90(open_mb)))
    sealing.add_row("peer: the bytes copied, unsealed", *(f"{v:.3f}" for v in p50_p90(copy_mb)))
    Console().print(sealing)
    print(f"sealed size overhead: {len(sealed) - len(value)} bytes per artifact", file=sys.stderr)
    inputs_table()


def inputs_table() -> None:
    """Reading typical inputs in an enclave: guarded against ``pickle.loads``."""
    import pickle

    import numpy
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    from metaflow_stack.confidential.inputs import TRUST, guarded_loads

    # Trusted by full class name, as @confidential(trust=[...]) names them (numpy arrays need no trust).
    trusted = ("sklearn.ensemble._forest.RandomForestClassifier", "sklearn.tree._classes.DecisionTreeClassifier")
    os.environ[TRUST] = " ".join((*trusted, "sklearn.tree._tree.Tree"))
    features, labels = load_iris(return_X_y=True)
    values = {
        "1M floats in a list": [float(i) for i in range(1_000_000)],
        "100k short strings in a dict": {f"key-{i}": f"value-{i}" for i in range(100_000)},
        "64 MiB numpy array (trusted)": numpy.ones(8 * 1024 * 1024),
        "random forest, 100 trees (trusted)": RandomForestClassifier(random_state=0).fit(features, labels),
    }
    table = Table(title="Reading an input in an enclave (ms per artifact)")
    for column in ("input", "pickled MiB", "pickle.loads p50", "guarded p50", "ratio"):
        table.add_column(column, justify="left" if column == "input" else "right")
    for name, value in values.items():
        data = pickle.dumps(value, protocol=4)
        plain = timed(lambda: pickle.loads(data), 5)  # noqa: B023
        guarded = timed(lambda: guarded_loads(data), 5)  # noqa: B023
        (plain50, _), (guarded50, _) = p50_p90(plain), p50_p90(guarded)
        size = f"{len(data) / 2**20:.1f}"
        table.add_row(name, size, f"{plain50:.1f}", f"{guarded50:.1f}", f"{guarded50 / plain50:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
