"""The gateway benchmarks still run end to end (half a second per cell: the table's shape is
checked, not its numbers), so they cannot rot."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from devstack.processes import REPO_ROOT

pytestmark = [pytest.mark.envoy, pytest.mark.slow]


def test_gateway_bench_prints_ratios_against_same_run_baselines():
    assert shutil.which("h2load"), "h2load (nghttp2-client) must be installed"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gateway_bench.py"),
                        "--duration", "0.5", "--warmup", "0.1", "--concurrency", "1", "4"],
                       capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if re.match(r"\| (baseline|noop|rpcauthz) \| \d+ \|", ln)]
    assert len(rows) == 6, r.stdout
    for ln in rows:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert int(cells[2]) > 0  # requests answered OK through the gateway
        assert all(re.fullmatch(r"\d+\.\d\dx", c) for c in cells[6:]), ln
    assert re.search(r"concurrency 4: rpcauthz costs [+-]\d+% p50", r.stdout)


def test_fast_path_bench_prints_ratios_and_the_scale_table():
    assert shutil.which("h2load"), "h2load (nghttp2-client) must be installed"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "fast_path_bench.py"),
                        "--duration", "0.5", "--warmup", "0.1", "--repeat", "1", "--concurrency", "2",
                        "--scale", "10,30,50"],
                       capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    scenarios = ("baseline", "fast_allow", "fast_allow_16k", "fast_allow_file", "fast_no_audit", "fast_allow_floor",
                 "fast_denied", "today_allow", "today_denied")
    rows = {m.group(1): ln for ln in r.stdout.splitlines()
            if (m := re.match(rf"\| ({'|'.join(scenarios)}) \| 2 \|", ln))}
    assert set(rows) == set(scenarios), r.stdout
    for ln in rows.values():
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert int(cells[2]) > 0  # requests answered through the gateway
        assert all(re.fullmatch(r"\d+\.\d\dx|-", c) for c in cells[6:]), ln
    assert re.search(r"concurrency 2: fast-path allows \d+\.\d\dx throughput", r.stdout)
    assert re.search(r"concurrency 2: the floor of any per-call audit .* \d+\.\d\dx throughput", r.stdout)
    # The CPU table prices each scenario against the baseline's CPU per call (the saturated-cores budget).
    assert re.search(r"\| baseline \| 2 \| \d+ \| \d+ \| \d+ \| (\d+) \| 1\.00x \|", r.stdout), r.stdout
    assert re.search(r"\| fast_allow \| 2 \| \d+ \| \d+ \| \d+ \| \d+ \| \d+\.\d\dx \|", r.stdout), r.stdout
    # Every fast-path allow of the run was audited: Envoy's count and the server's agree.
    assert re.search(r"fast-path allows: Envoy counted (\d+), the server audited \1 \(equal\)", r.stdout), r.stdout
    # The scale table's modes came through the reflection cache from scale_bench's services.
    assert re.search(r"\| grants \(engineer \+ contributor\), services with modes \(through the reflection cache\) "
                     r"\| [\d,]+, 11 \|", r.stdout), r.stdout
    assert re.search(r"\| compiled RBAC policy \(fastpath.compile, serialized\) \| \d+ KiB \(51 engineers x 11 paths, "
                     r"10 contributor services\) \|", r.stdout), r.stdout
    assert re.search(r"\| xDS push of a new version: publish -> Envoy ACK \(median of 3\) \| \d+ ms \|", r.stdout)
    assert re.search(r"\| grant change: store write -> Envoy ACK of a version compiled from it .* \| \d+ ms \(\d+-\d+\) \|",
                     r.stdout)
    assert re.search(r"\| mode change: reflection answer taken by the cache -> Envoy ACK .* \| \d+ ms \(\d+-\d+\) \|",
                     r.stdout)
    assert re.search(r"\| Envoy memory allocated \(admin /memory\) \| \d+\.\d MiB \|", r.stdout)


def test_fast_path_attribution_prices_each_part_against_the_same_run():
    assert shutil.which("h2load"), "h2load (nghttp2-client) must be installed"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "fast_path_attribution.py"),
                        "--duration", "0.5", "--warmup", "0.1", "--repeat", "1", "--concurrency", "2"],
                       capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = ("baseline", "fast_no_audit", "no_ext_authz", "no_strip", "no_headers", "audit_als", "audit_als_sink",
             "audit_file")
    rows = {m.group(1): ln for ln in r.stdout.splitlines()
            if (m := re.match(rf"\| ({'|'.join(names)}) \| 2 \| \d+\.\d\dx", ln))}
    assert set(rows) == set(names), r.stdout
    for ln in rows.values():
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert all(re.fullmatch(r"\d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\]", c) for c in cells[2:]), ln
    assert "| fast_no_audit | 2 | 1.00x [1.00-1.00] | 1.00x [1.00-1.00] |" in r.stdout
    assert re.search(r"\| audit_file \| 2 \| \d+ \| \d+ \| \d+ \|", r.stdout), r.stdout  # its CPU row
    sunk = re.search(r"audit_als_sink: Envoy wrote (\d+) access-log entries to the sink and dropped (\d+)", r.stdout)
    assert sunk and int(sunk[1]) > 0 and sunk[2] == "0", r.stdout


def test_als_receiver_bench_captures_envoys_messages_and_prints_cpu_per_stage(tmp_path):
    assert shutil.which("h2load"), "h2load (nghttp2-client) must be installed"
    capture = tmp_path / "als.bin"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "als_receiver_bench.py"),
                        "--capture-seconds", "0.5", "--capture-concurrency", "2", "--repeat", "1",
                        "--save", str(capture)],
                       capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"captured: \d+ message\(s\) from Envoy, [1-9]\d* entries", r.stdout), r.stdout
    stages = re.findall(r"\| N=\d+[^|]* \| (parse|read|receive|ship|end to end) \| \d+\.\d \[", r.stdout)
    assert stages == ["parse", "read", "receive", "ship", "end to end"] * 2, r.stdout
    again = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "als_receiver_bench.py"),
                            "--load", str(capture), "--repeat", "1", "--only", "small", "--end-to-end-only",
                            "--compare"],
                           capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.findall(r"\| N=16, (direct|spool) \| (\w[\w ]*) \|", again.stdout) == [
        (path, stage) for path in ("direct", "spool") for stage in ("receive", "ship", "end to end")]


def test_envoy_instructions_counts_what_the_composite_gate_saves():
    """Instruction counts do not move with the machine's load, so their order is asserted:
    ext_authz left inside a filter that every request makes (``filter_enabled_metadata``) costs
    Envoy more per fast-path allow than the composite gate that makes it only when needed."""
    assert shutil.which("valgrind") and shutil.which("h2load"), "valgrind and h2load must be installed"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "envoy_instructions.py"),
                        "--calls", "100", "--warmup-calls", "20", "--concurrency", "4",
                        "--only", "fast_no_audit", "fast_gate_in_filter"],
                       capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = {m.group(1): int(m.group(2).replace(",", ""))
              for m in re.finditer(r"^\| (\w+) \| ([\d,]+) \|", r.stdout, re.M)}
    assert set(counts) == {"fast_no_audit", "fast_gate_in_filter"}, r.stdout
    assert counts["fast_gate_in_filter"] - counts["fast_no_audit"] > 10_000, r.stdout


def test_fastpath_shards_bench_sends_one_smaller_part_per_grant_change():
    """The sharded policy bench (1/10 of the organisation): each grant change sends one part
    (the bench asserts it is the changed principal's), smaller than the whole policy."""
    r = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "fastpath_shards_bench.py"),
                        "--quick", "--shards", "1", "4"],
                       capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^\| ([^|]+?) \| ([\d.]+) \| ([\d.]+) \|$", r.stdout, re.M)}
    for change in ("new engineer", "contributor revoked"):
        assert rows[f"{change}: parts sent"] == (1, 1), r.stdout
        whole, part = rows[f"{change}: bytes sent (MB)"]
        assert part < whole, r.stdout
    assert rows["policy (MB)"][1] > rows["policy (MB)"][0]  # what sharding costs: the paths in every part
