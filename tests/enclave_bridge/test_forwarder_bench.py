"""The forwarder benchmark runs end to end (tiny sizes) and prints its ratio table."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize("hops", [[], ["--two-hop"]])
def test_bench_prints_ratios_against_socat(hops):
    done = subprocess.run(
        [sys.executable, "bench/forwarder_bench.py", "--megabytes", "4", "--round-trips", "30", "--repeat", "1", *hops],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split()[-4:] == ["direct", "socat", "forwarder", "fwd/socat"]
    rows = {line[:44].strip(): line[44:].split() for line in lines if line.startswith(("throughput", "RTT", "added"))}
    assert len(rows) == 5
    direct, socat, ours, ratio = rows["throughput MiB/s (higher is better)"]
    assert float(direct) > 0 and float(socat) > 0 and float(ours) > 0
    assert abs(float(ratio) - float(ours) / float(socat)) < 0.02 * float(ratio) + 0.01
