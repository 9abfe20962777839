"""bench/scale_bench.py still runs end to end at its --quick size, so it cannot rot, and at
that size the goals that do not depend on the machine's speed hold."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow]


def test_scale_bench_quick_prints_small_vs_large_with_ratios():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "scale_bench.py"), "--quick"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {m[1]: m for m in re.finditer(
        r"^\| ([^|]+?) \| ([\d,.]+) \| ([\d,.]+) \| ([\d.]+x|-) \|$", r.stdout, re.M)}
    for figure in ("sync unchanged (s)", "sweep (ms)", "reviewable list (ms)",
                   "gateway find_requests (us)", "grants full load (ms)", "warm check p50 (us)",
                   "grant change visible in all replicas, max (s)", "full gc (ms)",
                   "RSS decision path (MB)", "reflection fetch, dialled afresh (CPU ms)",
                   "warm check p50 / same-moment reference", "longest GC pause during checks (ms)"):
        assert figure in rows, f"{figure} missing from:\n{r.stdout}"
    # grant changes travel as deltas: no replica had to reload everything
    assert float(rows["full loads by replicas after start"][3].replace(",", "")) == 0
    # the heap frozen at start-up leaves full collections little to walk
    for goal in ("grant change in every replica within 1 s", "unchanged sync <= 2 s", "full gc <= 20 ms"):
        assert re.search(rf"\| {re.escape(goal)} \| met \|", r.stdout), r.stdout


def test_warm_check_pieces_prints_each_piece_at_both_sizes():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "warm_check_pieces.py"), "--quick", "--rounds", "3",
                        "--n", "200"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = re.findall(r"^\| ([^|]+?) \| (\d+) \| (\d+) \| ([+-]\d+) \| (\d+\.\d\d)x \| ([+-]\d+|-) \|$",
                      r.stdout, re.M)
    assert [row[0] for row in rows] == ["request strings", "+ path index", "+ engineer", "+ contributor",
                                        "whole check"], r.stdout
    for _, small, large, *_ in rows:
        assert int(small) > 0 and int(large) > 0
    # the whole check (a decision) costs more than making its request's strings alone
    assert int(rows[-1][1]) > int(rows[0][1]), r.stdout


def test_warm_check_misses_runs_the_checks_it_counts_without_valgrind():
    for shape in ("pipeline", "bench"):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "warm_check_misses.py"), "--one", "small", "200",
                            shape], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
