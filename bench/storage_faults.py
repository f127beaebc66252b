"""What sharing one S3 client and retrying through faults cost, against moto_server on loopback.

    python bench/storage_faults.py [--objects 200] [--size 64KB] [--repeats 5] [--rate 0.05]

Starts moto_server and the tests' fault proxy (tests/faultproxy.py), writes ``--objects`` objects
of ``--size`` bytes, then times, in the same run (medians over ``--repeats``, the cases taking
turns run by run):

* opening a ``Store`` per object with the shared client (what chatvec does) against making a new
  S3 client for each (what it did before clients were shared);
* reading every object straight from moto, through the proxy with no faults (the proxy's own
  cost), and through the proxy spoiling a ``--rate`` fraction of requests (cut, dropped, 503 in
  turn; seeded), with chatvec's retries bringing every byte back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' fault proxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        sys.exit("moto_server is missing: pip install 'moto[server]'")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("moto_server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--size", default="64KB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rate", type=float, default=0.05)
    args = ap.parse_args()

    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "CHATVEC_STORAGE_BACKOFF_S": "0.05",
        }
    )
    from faultproxy import FaultProxy, Faults

    from chatvec.core import storage_clients
    from chatvec.core.storage import Store
    from chatvec.core.units import parse_size

    size = parse_size(args.size)
    moto, endpoint = start_moto()
    try:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        bucket = "bench"
        Store(f"s3://{bucket}").fs.create_dir(bucket)
        payload = os.urandom(size)
        names = [f"obj-{i:05d}.bin" for i in range(args.objects)]
        root = Store(f"s3://{bucket}/data")
        for name in names:
            root.write_bytes(name, payload)

        with FaultProxy(endpoint) as proxy:

            def open_stores(shared: bool) -> None:
                for name in names:
                    if not shared:
                        storage_clients.clear()
                    Store(f"s3://{bucket}/data/{name}")

            def read_all(where: str, faults: Faults | None) -> None:
                os.environ["AWS_ENDPOINT_URL"] = where
                if faults is not None:
                    proxy.set_faults(faults)
                store = Store(f"s3://{bucket}/data")
                for name in names:
                    if store.read_bytes(name) != payload:
                        raise SystemExit(f"{name}: wrong bytes")

            cases = {
                "Store per object, shared client": lambda: open_stores(True),
                "Store per object, new client each": lambda: open_stores(False),
                "read all, straight to moto": lambda: read_all(endpoint, None),
                "read all, proxy, no faults": lambda: read_all(proxy.endpoint, Faults(first=0)),
                f"read all, proxy, {args.rate:.0%} faults": lambda: read_all(
                    proxy.endpoint, Faults(mode=("cut", "refuse", "slowdown"), rate=args.rate, seed=1)
                ),
            }
            times: dict[str, list[float]] = {k: [] for k in cases}
            spoiled = []
            for run in cases.values():  # warm-up
                run()
            for _ in range(args.repeats):
                for name, run in cases.items():
                    t = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t)
                    if "faults" in name and "no faults" not in name:
                        spoiled.append(proxy.spoiled)
    finally:
        moto.terminate()
        moto.wait(10)

    base = {
        "Store": statistics.median(times["Store per object, shared client"]),
        "read": statistics.median(times["read all, straight to moto"]),
    }
    print(
        f"{args.objects} objects of {args.size}; medians of {args.repeats} runs; "
        f"faulty reads spoiled {statistics.median(spoiled):.0f} requests per run"
    )
    print()
    print("| case | s (median) | fastest | x baseline |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        ref = base["Store"] if name.startswith("Store") else base["read"]
        print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f} | {statistics.median(ts) / ref:.2f} |")


if __name__ == "__main__":
    main()
