#!/usr/bin/env python3
"""One large file over scp:// and http(s):// with pilotfish.transfer vs plain ``scp`` and
``curl`` of the same file from the same server, in the same run.

A file of ``--mb`` MiB (default 500) of random bytes on the real disk (``--dir``, default a
temporary directory under /var/tmp) is served by a real sshd (OpenSSH, key auth, loopback) and
a real HTTP and HTTPS server (tests/transfer_servers.py, sendfile). For each protocol and each
repeat, the baseline and ours run back to back (the order alternates between repeats), each
writing a fresh copy to the same disk; the copy is checked by size. Figures: the median seconds
and MiB/s of each, ``ratio`` = ours / baseline throughput of the medians (target >= 0.8), and
``ratio_of_best`` of the fastest runs (less sensitive to other load on the machine).

Both read the source from the page cache after the first run (the file is read once before
timing); after each run the copy is removed and ``sync`` runs, untimed, so a run never pays for
the previous one's writeback. The machine has 2 cores shared with other work: the load average
is in every line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from transfer_servers import HttpServer, Sshd  # noqa: E402

from pilotfish.transfer import Limits, scheme_for  # noqa: E402
from pilotfish.transfer.credentials import Credentials  # noqa: E402


def log(msg: str) -> None:
    print(f"[transfer_speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="pf-transfer-bench-", dir=a.dir))
    servers = []
    try:
        src_dir = d / "files"
        src_dir.mkdir()
        src = src_dir / "big.bin"
        log(f"writing {a.mb} MiB to {src}")
        with open(src, "wb") as f:
            for _ in range(a.mb):
                f.write(os.urandom(1 << 20))
        size = src.stat().st_size
        sshd = Sshd(d / "sshd")
        http = HttpServer(src_dir)
        https = HttpServer(src_dir, tls_dir=d / "tls")
        servers += [sshd, http, https]
        creds = Credentials.from_mapping({**sshd.credentials(),
                                          "https://127.0.0.1": {"ca_file": str(https.cert)}})
        out = d / "out"
        out.mkdir()
        lim = Limits(timeout=3600, max_bytes=1 << 40, stall=120)

        def fresh(name: str) -> Path:
            p = out / name
            if p.exists():
                p.unlink()
            return p

        def check(p: Path) -> None:
            assert p.stat().st_size == size, (p, p.stat().st_size)
            p.unlink()
            os.sync()  # untimed: the next run must not pay for this one's writeback
            time.sleep(1)

        cases = {
            "scp": (
                lambda p: subprocess.run(
                    ["scp", "-q", "-B", "-i", str(sshd.key), "-o",
                     f"UserKnownHostsFile={sshd.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                     "-P", str(sshd.port), f"{sshd.user}@127.0.0.1:{src}", str(p)],
                    check=True),
                sshd.url("scp", str(src)), "plain scp (OpenSSH, same key and server)"),
            "http": (
                lambda p: subprocess.run(["curl", "-sS", "-f", "-o", str(p),
                                          http.url("/big.bin")], check=True),
                http.url("/big.bin"), "curl"),
            "https": (
                lambda p: subprocess.run(["curl", "-sS", "-f", "--cacert", str(https.cert),
                                          "-o", str(p), https.url("/big.bin")], check=True),
                https.url("/big.bin"), "curl --cacert"),
        }
        with open(src, "rb") as f:  # into the page cache for both
            while f.read(1 << 24):
                pass
        for name, (baseline, url, what) in cases.items():
            scheme = scheme_for(url, credentials=creds)
            base_t, ours_t = [], []
            for r in range(a.repeats):
                order = [("base", baseline), ("ours", None)]
                if r % 2:
                    order.reverse()
                for who, fn in order:
                    p = fresh(f"{name}-{who}")
                    if who == "base":
                        base_t.append(timed(lambda: fn(p)))
                    else:
                        ours_t.append(timed(lambda: scheme.get(url, str(p), lim)))
                    check(p)
                log(f"{name} repeat {r + 1}: {what} {base_t[-1]:.2f} s, ours {ours_t[-1]:.2f} s")
            b, o = statistics.median(base_t), statistics.median(ours_t)
            mib = size / 2**20
            print(json.dumps({
                "bench": "transfer_speed", "figure": f"{name}_one_large_file",
                "bytes": size, "repeats": a.repeats,
                "ours_seconds": round(o, 3), "ours_mib_per_s": round(mib / o, 1),
                "baseline": what, "baseline_seconds": round(b, 3),
                "baseline_mib_per_s": round(mib / b, 1),
                "ratio": round(b / o, 3), "target": 0.8,
                "ratio_of_best": round(min(base_t) / min(ours_t), 3),
                "loadavg": [round(x, 2) for x in os.getloadavg()], "disk": str(d)}),
                flush=True)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
