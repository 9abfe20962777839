"""What does making one audit event durable cost, by way of writing it?

The spool-first writer (extauthz/spooled_audit.py) makes each group of decision events durable
before the checks are answered; at concurrency 1 every check pays one such write. This times
one small event per durable write, on the same disk, for:

  sqlite-full      the spool as shipped: SQLite WAL, synchronous=FULL (fsync per commit) [baseline]
  sqlite-normal    SQLite WAL, synchronous=NORMAL: no fsync at commit. Survives kill -9 (the
                   WAL frame is in the OS page cache), NOT a power loss or kernel crash
  append-fdatasync append to a growing file, then fdatasync
  prealloc-fdatasync  write into a preallocated file (no size change), then fdatasync
  prealloc-odsync  the same file opened O_DSYNC: the write returns once on disk

Rounds alternate the variants (ABCDE, EDCBA, ...); medians of the rounds, wall and CPU time
per write, and each variant's ratio to the baseline of the same run.

    python bench/spool_sync_bench.py [--writes 400] [--rounds 5] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable

EVENT = json.dumps({"kind": "decision.allow", "actor": "bench-engineer", "at": "2026-12-03T00:00:00+00:00",
                    "service": "rpcauthz.demo.v1.Accounts", "method": "ListAccounts", "outcome": "allow",
                    "detail": {"decision_id": "0" * 32, "rule": "mode.engineers_without_approval"},
                    "id": "1" * 32}).encode()
PREALLOC = 64 << 20


def _sqlite(path: str, sync: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={sync}")
    db.execute("CREATE TABLE IF NOT EXISTS s (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, "
               "event TEXT, at REAL)")

    def write(i: int) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO s (id, event, at) VALUES (?, ?, ?)", (f"{path}{i}{time.time_ns()}",
                                                                       EVENT.decode(), time.time()))
        db.execute("COMMIT")
    return write, db.close


def _file(path: str, *, prealloc: bool, odsync: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_DSYNC if odsync else 0)
    fd = os.open(path, flags, 0o600)
    if prealloc:
        os.posix_fallocate(fd, 0, PREALLOC)
        os.fsync(fd)
    offset = [0]
    record = len(EVENT).to_bytes(4, "little") + EVENT

    def write(_i: int) -> None:
        os.pwrite(fd, record, offset[0])
        offset[0] = (offset[0] + len(record)) % (PREALLOC - len(record))
        if not odsync:
            os.fdatasync(fd)
    return write, lambda: os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=400, help="durable writes per round and variant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="spool-sync-", dir=args.dir)
    variants: dict[str, tuple[Callable[[int], None], Callable[[], None]]] = {
        "sqlite-full": _sqlite(os.path.join(workdir, "full.db"), "FULL"),
        "sqlite-normal": _sqlite(os.path.join(workdir, "normal.db"), "NORMAL"),
        "append-fdatasync": _file(os.path.join(workdir, "append.log"), prealloc=False, odsync=False),
        "prealloc-fdatasync": _file(os.path.join(workdir, "prealloc.log"), prealloc=True, odsync=False),
        "prealloc-odsync": _file(os.path.join(workdir, "odsync.log"), prealloc=True, odsync=True),
    }
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    try:
        for rnd in range(args.rounds):
            for name in (names if rnd % 2 == 0 else names[::-1]):
                write = variants[name][0]
                w0, c0 = time.perf_counter(), time.process_time()
                for i in range(args.writes):
                    write(i)
                wall[name].append((time.perf_counter() - w0) / args.writes)
                cpu[name].append((time.process_time() - c0) / args.writes)
    finally:
        for _write, close in variants.values():
            close()
    base_w, base_c = statistics.median(wall[names[0]]), statistics.median(cpu[names[0]])
    print(f"{args.writes} durable writes x {args.rounds} rounds in {workdir}; medians per write")
    print("| variant | wall (µs) | wall range (µs) | CPU (µs) | wall vs sqlite-full | CPU vs sqlite-full |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"| {name} | {w * 1e6:.0f} | {min(wall[name]) * 1e6:.0f}-{max(wall[name]) * 1e6:.0f} "
              f"| {c * 1e6:.0f} | {w / base_w:.2f}x | {c / base_c:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
