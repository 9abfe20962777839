"""Forwarder throughput and added latency, against socat on the same path, measured in one run.

    python bench/forwarder_bench.py [--megabytes 256] [--round-trips 2000] [--repeat 3] [--two-hop]

Three paths to the same target server on 127.0.0.1:
  direct     client -> target
  socat      client -> socat TCP-LISTEN -> target           (the baseline)
  forwarder  client -> mpactl forward tcp:// -> target      (ours, the CLI as deployed)
With --two-hop, socat and the forwarder each run as two processes joined by a unix socket
(tcp -> unix -> tcp), the shape of the parent/enclave pair with unix standing in for vsock.
Throughput: one connection uploads N MiB; the target counts them and answers after EOF.
Latency: 64-byte ping-pongs over one connection; "added" is the path's RTT minus the direct RTT.
Prints a table whose last column is forwarder / socat (throughput: higher is better; added latency:
lower is better).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHUNK = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the target: a sink for throughput, an echo for latency (first byte selects) ----------------

def serve_target(port: int) -> None:
    server = socket.create_server(("127.0.0.1", port), backlog=64)

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = conn.recv(1)
            if mode == b"S":  # sink: count bytes until EOF, answer with the count
                buf, total = bytearray(CHUNK), 0
                while n := conn.recv_into(buf):
                    total += n
                conn.sendall(str(total).encode())
            elif mode == b"E":  # echo
                while data := conn.recv(65536):
                    conn.sendall(data)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def wait_listening(where: int | str, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Wait until something accepts on TCP port ``where`` (int) or unix socket path ``where`` (str)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            if isinstance(where, int):
                socket.create_connection(("127.0.0.1", where), timeout=1).close()
            else:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(where)
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {where} after {timeout}s")


def forwarder_args(listen: str, to: str) -> list[str]:
    return [sys.executable, "-m", "mpactl.app", "forward", "--listen", listen, "--to", to,
            "--log-level", "warning"]


@contextlib.contextmanager
def process(args: list[str], port: int | str):
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- measurements --------------------------------------------------------------------------------

def throughput(port: int, megabytes: int) -> float:
    """MiB/s for uploading ``megabytes`` MiB through ``port`` (time until the target confirms)."""
    payload = os.urandom(CHUNK)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        start = time.perf_counter()
        s.sendall(b"S")
        for _ in range(megabytes):
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(64):
            answer += chunk
        elapsed = time.perf_counter() - start
    if int(answer) != megabytes * CHUNK:
        raise RuntimeError(f"target received {answer!r} bytes, expected {megabytes * CHUNK}")
    return megabytes / elapsed


def round_trips(port: int, count: int, size: int = 64) -> list[float]:
    """Round-trip times in microseconds for ``count`` ping-pongs of ``size`` bytes."""
    message = os.urandom(size)
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"E")
        for i in range(count + 10):
            start = time.perf_counter()
            s.sendall(message)
            got = b""
            while len(got) < size:
                got += s.recv(size - len(got))
            if i >= 10:  # warm-up excluded
                times.append((time.perf_counter() - start) * 1e6)
            if got != message:
                raise RuntimeError("echo mismatch")
    return times


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def run(args) -> dict[str, dict[str, float]]:
    if shutil.which("socat") is None:
        raise SystemExit("socat is not on PATH; it is the baseline (apt-get install socat)")
    target, via_socat, via_forwarder = free_port(), free_port(), free_port()
    paths = (("direct", target), ("socat", via_socat), ("forwarder", via_forwarder))
    tput: dict[str, list[float]] = {name: [] for name, _ in paths}
    rtts: dict[str, list[list[float]]] = {name: [] for name, _ in paths}
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="fwdbench-"))
        stack.enter_context(process([sys.executable, __file__, "--serve-target", str(target)], target))
        socat_listen = f"TCP-LISTEN:{via_socat},bind=127.0.0.1,reuseaddr,fork"
        if args.two_hop:
            socat_sock, fwd_sock = os.path.join(scratch, "socat.sock"), os.path.join(scratch, "fwd.sock")
            stack.enter_context(process(["socat", f"UNIX-LISTEN:{socat_sock},fork",
                                         f"TCP:127.0.0.1:{target},nodelay"], socat_sock))
            stack.enter_context(process(["socat", socat_listen, f"UNIX-CONNECT:{socat_sock}"], via_socat))
            stack.enter_context(process(forwarder_args(f"unix://{fwd_sock}", f"tcp://127.0.0.1:{target}"), fwd_sock))
            stack.enter_context(process(forwarder_args(f"tcp://127.0.0.1:{via_forwarder}", f"unix://{fwd_sock}"),
                                        via_forwarder))
        else:
            stack.enter_context(process(["socat", socat_listen, f"TCP:127.0.0.1:{target},nodelay"], via_socat))
            stack.enter_context(process(forwarder_args(f"tcp://127.0.0.1:{via_forwarder}",
                                                       f"tcp://127.0.0.1:{target}"), via_forwarder))
        # Paths take turns in every round so machine noise hits all of them alike.
        for _ in range(args.repeat):
            for name, port in paths:
                tput[name].append(throughput(port, args.megabytes))
                rtts[name].append(round_trips(port, args.round_trips))
    return {
        name: {
            "throughput": max(tput[name]),
            "p50": statistics.median(statistics.median(r) for r in rtts[name]),
            "p99": statistics.median(percentile(r, 99) for r in rtts[name]),
        }
        for name, _ in paths
    }


def ratio(ours: float, baseline: float) -> str:
    """ours / baseline, or n/a when the baseline is within noise of zero."""
    return f"{ours / baseline:.2f}" if baseline > 0.5 else "n/a"


def table(results: dict[str, dict[str, float]]) -> str:
    d, s, f = results["direct"], results["socat"], results["forwarder"]
    added = {name: {k: results[name][k] - d[k] for k in ("p50", "p99")} for name in ("socat", "forwarder")}
    rows = [
        ("throughput MiB/s (higher is better)", d["throughput"], s["throughput"], f["throughput"],
         ratio(f["throughput"], s["throughput"])),
        ("RTT p50 us", d["p50"], s["p50"], f["p50"], ratio(f["p50"], s["p50"])),
        ("RTT p99 us", d["p99"], s["p99"], f["p99"], ratio(f["p99"], s["p99"])),
        ("added p50 us vs direct (lower is better)", 0.0, added["socat"]["p50"], added["forwarder"]["p50"],
         ratio(added["forwarder"]["p50"], added["socat"]["p50"])),
        ("added p99 us vs direct (lower is better)", 0.0, added["socat"]["p99"], added["forwarder"]["p99"],
         ratio(added["forwarder"]["p99"], added["socat"]["p99"])),
    ]
    lines = [f"{'metric':<44}{'direct':>12}{'socat':>12}{'forwarder':>12}{'fwd/socat':>12}"]
    lines += [f"{name:<44}{a:>12.1f}{b:>12.1f}{c:>12.1f}{r:>12}" for name, a, b, c, r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=256, help="MiB uploaded per throughput run")
    parser.add_argument("--round-trips", type=int, default=2000, help="ping-pongs per latency run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path (best throughput, median latency)")
    parser.add_argument("--two-hop", action="store_true", help="tcp -> unix -> tcp through two processes each")
    parser.add_argument("--serve-target", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_target:
        serve_target(args.serve_target)
        return
    results = run(args)
    path = "tcp -> unix -> tcp (two processes each)" if args.two_hop else "tcp -> tcp"
    print(f"forwarder bench, {path}: {args.megabytes} MiB upload, {args.round_trips} x 64-byte round trips, "
          f"best/median of {args.repeat}; same machine, same run")
    print(table(results))


if __name__ == "__main__":
    main()
