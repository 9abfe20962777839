"""What does our server spend, in CPU, per line of the fast path's audit file (issue 12)?

``fast_path.audit_file`` has Envoy write one JSON line per fast-path allow and the server tail
it (extauthz/file_audit.py). This bench prices the tailer's reading, per line, the way it was
(each line to an ``HTTPAccessLogEntry`` by ``line_entry``, read by ``EntryReader.rows`` a node
at a time) against the way it is (``LineReader.lines``: JSON straight into rows), in the same
run, interleaved rounds, as a ratio:

- ``read``: the lines into spool rows and store columns (what a SQLite store takes directly)
  as the tailer cuts them (``READ_BYTES`` a batch, ``LINE_CHUNK`` lines at a time), nothing written;
- ``store write``: those rows into a SQLite store (``append_audit_rows``, a batch a transaction):
  the store's part of the tailer, the same work either way (the rows are equal);
- ``tailer``: ``FileAuditTailer.poll_once`` end to end over a file of those lines (read, rows,
  ``write_rows`` straight into a SQLite store, the position saved), until it is at the end.

The lines are shaped as Envoy 1.40 writes them (``audit_file_fields``: keys sorted, compact,
UUID request ids; a few principals, paths and connections; about 5000 calls a second). CPU is
``time.process_time()`` (every thread of this process), per line, median over rounds.

    python bench/file_tail_bench.py                 # 20000 lines, 5 rounds
    python bench/file_tail_bench.py --lines 50000 --repeat 7 --no-tailer
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from extauthz.access_log import EntryReader  # noqa: E402
from extauthz.config import Settings  # noqa: E402
from extauthz.file_audit import LINE_CHUNK, READ_BYTES, LineReader, line_entry  # noqa: E402

PATHS = ["/rpcauthz.demo.v1.Accounts/ListAccounts", "/rpcauthz.demo.v1.Ledger/GetBalance"]
PRINCIPALS = ["alice", "bob", "carol", "dave"]


def envoy_lines(n: int, node: str, rate: int = 5000, seed: int = 1) -> list[bytes]:
    """``n`` lines as Envoy's file log writes fast-path allows (``audit_file_fields``), ``rate``
    a second, over 16 connections; ``node`` makes their event ids this run's own."""
    import random
    rnd = random.Random(seed)
    start = 1_796_288_400.0
    out = []
    for i in range(n):
        t = start + i / rate
        sec = int(t)
        rid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        d = {"start_time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{int((t - sec) * 1e6):06d}Z",
             "principal": PRINCIPALS[i % len(PRINCIPALS)], "path": PATHS[i % len(PATHS)], "fast_path": "allowed",
             "policy_id": "v42/engineers", "request_id": rid, "stream_id": rid,
             "downstream_remote_address": f"127.0.0.1:{40000 + i % 16}", "node": node}
        out.append(json.dumps(d, sort_keys=True, separators=(",", ":")).encode())
    return out


class OldLineReader(EntryReader):
    """The tailer's reading before ``LineReader`` (its ``_audit_lines``): each line to an entry
    (``line_entry``), the entries read by ``EntryReader.rows`` a run of one node at a time."""

    def lines(self, lines: Sequence[bytes], first: int, rows: list[tuple[str, str]],
              refused: Callable[[int, str, Exception], None], columns: list[tuple[Any, ...]] | None = None) -> int:
        from extauthz.access_log import MalformedEntry
        run: list[Any] = []
        offsets: dict[int, int] = {}
        run_node = ""

        def flush() -> None:
            if run:
                rows.extend(self.rows(run, run_node, lambda entry, e: refused(
                    offsets[id(entry)], entry.request.request_id or "-", e), columns))
                run.clear()
                offsets.clear()
        received, at = 0, first
        for line in lines:
            where = at
            at += len(line) + 1
            if not line.strip():
                continue
            received += 1
            try:
                entry, node = line_entry(line, self._settings)
            except MalformedEntry as e:
                refused(where, "-", e)
                continue
            if node != run_node:
                flush()
                run_node = node
            run.append(entry)
            offsets[id(entry)] = where
        flush()
        return received


def _refused(where: int, rid: str, e: Exception) -> None:
    raise RuntimeError(f"a line was refused at offset {where}: {e}")


def batches(lines: list[bytes]) -> list[list[bytes]]:
    """``lines`` cut as the tailer reads them: at most ``READ_BYTES`` at a time."""
    out: list[list[bytes]] = [[]]
    size = 0
    for line in lines:
        if size + len(line) + 1 > READ_BYTES:
            out.append([])
            size = 0
        out[-1].append(line)
        size += len(line) + 1
    return out


def read_cpu(reader: Any, lines: list[bytes]) -> float:
    """CPU seconds per line to read ``lines`` into rows and columns as the tailer does: a batch
    of up to ``READ_BYTES`` at a time (its rows then dropped, as once written), a ``LINE_CHUNK``
    of lines at a time."""
    cut = batches(lines)
    t = time.process_time()
    got = 0
    for batch in cut:
        rows: list[tuple[str, str]] = []
        columns: list[tuple[Any, ...]] = []
        for n in range(0, len(batch), LINE_CHUNK):
            reader.lines(batch[n:n + LINE_CHUNK], 0, rows, _refused, columns)
        got += len(rows) if len(rows) == len(columns) else 0
    cpu = (time.process_time() - t) / len(lines)
    if got != len(lines):
        raise RuntimeError(f"{got} rows of {len(lines)} lines")
    return cpu


def write_cpu(workdir: pathlib.Path, name: str, lines: list[bytes], settings: Settings) -> float:
    """CPU seconds per line for a SQLite store to take the rows of ``lines`` as the tailer hands
    them (``append_audit_rows`` of a batch's columns, one transaction a batch): the part of
    ``tailer`` that is the store's, the same whichever way the lines were read."""
    from policy.stores import open_store

    store = open_store(f"sqlite:///{workdir / f'{name}-store.db'}")
    reader = LineReader(settings)
    try:
        cpu = 0.0
        for batch in batches(lines):
            rows: list[tuple[str, str]] = []
            columns: list[tuple[Any, ...]] = []
            reader.lines(batch, 0, rows, _refused, columns)
            t = time.process_time()
            store.append_audit_rows(columns)
            cpu += time.process_time() - t
        return cpu / len(lines)
    finally:
        store.close()


async def tailer_cpu(workdir: pathlib.Path, name: str, old: bool, lines: list[bytes]) -> float:
    """CPU seconds per line for ``FileAuditTailer`` to audit a file of ``lines`` into a SQLite store
    (directly, as while it answers), with the old reading or the new."""
    from extauthz.audit_spool import AuditSpool
    from extauthz.file_audit import FileAuditTailer
    from extauthz.metrics import Metrics
    from extauthz.spooled_audit import SpooledAuditWriter
    from policy.stores import open_store

    d = workdir / name
    d.mkdir()
    log = d / "audit.log"
    log.write_bytes(b"\n".join(lines) + b"\n")
    settings = Settings(store_url=f"sqlite:///{d / 'store.db'}", fast_path={"audit_file": str(log)})
    store = open_store(settings.store_url)
    metrics = Metrics()
    spool = AuditSpool(str(d / "spool.db"), 1_000_000)
    writer = SpooledAuditWriter(store, metrics, spool, 100_000, direct_timeout=60.0)
    writer.start()
    tailer = FileAuditTailer(settings, writer, metrics, str(d / "spool.db"))
    if old:
        tailer._reader = OldLineReader(settings)  # type: ignore[assignment]
    try:
        t = time.process_time()
        while await tailer.poll_once():
            pass
        cpu = (time.process_time() - t) / len(lines)
        audited = metrics.registry.get_sample_value("rpcauthz_fast_path_entries_total", {"result": "audited"})
        if audited != len(lines) or spool.stats()["depth"]:
            raise RuntimeError(f"{audited} of {len(lines)} lines audited, or some left in the spool")
        return cpu
    finally:
        tailer.close()
        await writer.close()
        spool.close()
        store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds; cells are medians")
    ap.add_argument("--no-tailer", action="store_true", help="the read stage only")
    args = ap.parse_args(argv)

    settings = Settings(store_url="sqlite:///unused.db")
    same = envoy_lines(min(args.lines, 2000), "same")
    got = {}
    for way, reader in (("old", OldLineReader(settings)), ("new", LineReader(settings))):
        rows: list[tuple[str, str]] = []
        columns: list[tuple[Any, ...]] = []
        reader.lines(same, 0, rows, _refused, columns)
        got[way] = (rows, columns)
    if got["old"] != got["new"]:
        raise RuntimeError("the old and the new reading give other rows for the same lines")
    cpu: dict[tuple[str, str], list[float]] = {}
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="rpcauthz-tailbench-"))
    try:
        for r in range(max(1, args.repeat)):
            for old in ((True, False) if r % 2 == 0 else (False, True)):
                way = "old" if old else "new"
                lines = envoy_lines(args.lines, f"bench-{os.getpid()}-{r}-{way}", seed=r)
                reader = OldLineReader(settings) if old else LineReader(settings)
                cpu.setdefault(("read", way), []).append(read_cpu(reader, lines))
                if not args.no_tailer:
                    cpu.setdefault(("store write", way), []).append(write_cpu(workdir, f"{r}-{way}-w", lines, settings))
                    cpu.setdefault(("tailer", way), []).append(
                        asyncio.run(tailer_cpu(workdir, f"{r}-{way}", old, lines)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"rows of the old and the new reading: equal (the same {len(same)} lines)")
    print(f"CPU per line, this process (all threads), {args.lines} lines, median over {args.repeat} round(s) "
          "[min-max]; old = line_entry + EntryReader.rows, new = LineReader.lines")
    print()
    print("| stage | old µs/line | new µs/line | new/old |")
    print("|---|---:|---:|---:|")
    for stage in ("read", "store write", "tailer"):
        if (stage, "old") not in cpu:
            continue
        o, n = cpu[(stage, "old")], cpu[(stage, "new")]
        mo, mn = statistics.median(o), statistics.median(n)
        print(f"| {stage} | {mo * 1e6:.1f} [{min(o) * 1e6:.1f}-{max(o) * 1e6:.1f}] "
              f"| {mn * 1e6:.1f} [{min(n) * 1e6:.1f}-{max(n) * 1e6:.1f}] | {mn / mo:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
