"""A bounded load test of a served chain on loopback, next to the same work in-process.

N requests (default 2,000) go to ``POST /v1/chains/echo/invoke`` from one ``httpx.AsyncClient`` with C
(default 64) in flight at once. Each request carries its own id in its input; the echo chain (one Python hop,
``workbench.demo:canned_answer``, which names its question in its answer) sends it back, so every response is
matched to its request: a response naming another request's id is a mismatch, a request with no response a
loss. Then the same N runs go through ``chain.arun`` in-process with the same concurrency: the floor a served
call can approach. Both report throughput and p50/p99 latency (clock started before each POST or ``arun``).

The server is ``autoglm serve`` in a child process by default (client and server then do not share a GIL, as
in production); ``--server thread`` serves from this process instead (``bench.serve``).

    python benchmarks/served_load.py                          # 2,000 requests at concurrency 64
    python benchmarks/served_load.py --requests 500 --concurrency 16 --server thread
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

ECHO_SPEC = """\
name: echo
hops:
  - name: echo
    call: workbench.demo:canned_answer
output: echo
"""


@dataclasses.dataclass
class LoadResult:
    """What one load run saw: latencies of the requests that succeeded, and what went wrong with the others."""

    label: str
    requests: int
    concurrency: int
    wall_s: float
    latencies_ms: list[float]
    statuses: dict[int, int]  # HTTP status (0: a transport error) -> count
    mismatched: int  # answers that named another request's id
    lost: int  # requests that got no answer at all

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def line(self) -> str:
        flag = " (p99 of < 100 samples)" if self.ok < 100 else ""
        return (f"{self.label:<12} {self.requests:>6} {self.concurrency:>5} {self.ok:>6} {self.lost:>5} "
                f"{self.mismatched:>6} {self.throughput:>9.1f} {self.pct(0.5):>8.2f} {self.pct(0.99):>8.2f}"
                f"{flag}")


HEADER = f"{'':<12} {'reqs':>6} {'conc':>5} {'ok':>6} {'lost':>5} {'mismat':>6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}"


def request_id(index: int, run: str) -> str:
    return f"req-{run}-{index:06d}"


async def _drive(requests: int, concurrency: int, call: Callable[[int], Awaitable[tuple[int, bool]]],
                 label: str) -> LoadResult:
    """Run ``call(i)`` for i in range(requests), ``concurrency`` at a time; ``call`` returns (status, matched)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    answered = [False] * requests
    mismatched = 0
    next_index = iter(range(requests))

    async def worker() -> None:
        nonlocal mismatched
        for index in next_index:  # one shared iterator: each index goes to exactly one worker
            started = time.perf_counter()
            try:
                status, matched = await call(index)
            except (httpx.HTTPError, OSError):
                status, matched = 0, False
            elapsed = (time.perf_counter() - started) * 1e3
            statuses[status] = statuses.get(status, 0) + 1
            if status == 0:
                continue
            answered[index] = True
            if not matched:
                mismatched += 1
            elif status == 200:
                latencies.append(elapsed)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return LoadResult(label, requests, concurrency, wall, latencies, statuses, mismatched, answered.count(False))


async def served(url: str, headers: dict[str, str], requests: int, concurrency: int, *, chain: str = "echo",
                 timeout_s: float = 30.0, label: str = "served") -> LoadResult:
    """``requests`` invokes of ``chain`` at ``url``, ``concurrency`` in flight, each matched to its answer."""
    run = os.urandom(3).hex()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as client:

        async def call(index: int) -> tuple[int, bool]:
            rid = request_id(index, run)
            response = await client.post(f"/v1/chains/{chain}/invoke",
                                         json={"inputs": {"question": rid}, "context_blob": rid})
            if response.status_code != 200:
                return response.status_code, True
            body = response.json()
            return 200, rid in str(body.get("output")) and body.get("context_blob") == rid

        return await _drive(requests, concurrency, call, label)


async def in_process(chain: Any, requests: int, concurrency: int, *, label: str = "in-process") -> LoadResult:
    """The same runs through ``await chain.arun(...)``: what serving the chain adds to is this."""
    run = os.urandom(3).hex()

    async def call(index: int) -> tuple[int, bool]:
        rid = request_id(index, run)
        result = await chain.arun(question=rid)
        return 200, rid in str(result.output)

    return await _drive(requests, concurrency, call, label)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[bytes] | None = None, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode} before it answered /health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url}/health did not answer in {timeout_s:.0f} s")


def serve_child(data_dir: Path, spec: Path, port: int) -> subprocess.Popen[bytes]:
    """``autoglm serve`` on ``spec`` as a child process, keys in ``data_dir``; rate limit off for the load."""
    script = Path(sys.executable).parent / "autoglm"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "workbench.fronts.cli"]
    env = dict(os.environ, AUTOGLM_RATE_PER_S="0")
    return subprocess.Popen([*command, "serve", "--spec", str(spec), "--port", str(port), "--host", "127.0.0.1",
                             "--data-dir", str(data_dir)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--server", choices=("process", "thread"), default="process",
                        help="autoglm serve in a child process, or bench.serve in this one")
    parser.add_argument("--warmup", type=int, default=50, help="requests sent before measuring, each side")
    args = parser.parse_args()

    import workbench as wb
    from workbench.fronts.server.auth import Auth, KeyStore

    with tempfile.TemporaryDirectory() as tmp, wb.Workbench(data_dir=tmp) as bench:
        data_dir = Path(tmp)
        key = KeyStore(data_dir).add("load", "runner")
        headers = {"authorization": f"Bearer {key}"}
        chain = bench.chain(ECHO_SPEC)
        process, server = None, None
        if args.server == "process":
            spec = data_dir / "echo.yaml"
            spec.write_text(ECHO_SPEC, encoding="utf-8")
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            process = serve_child(data_dir, spec, port)
        else:
            server = bench.serve(chains=[chain], port=0, auth=Auth(data_dir, rate_per_s=None))
            url = server.url.rstrip("/")
        try:
            wait_healthy(url, process)
            asyncio.run(served(url, headers, args.warmup, min(args.warmup, args.concurrency), label="warm-up"))
            asyncio.run(in_process(chain, args.warmup, min(args.warmup, args.concurrency), label="warm-up"))
            # Interleaved: served, in-process, served, in-process, each half the requests.
            halves = [args.requests // 2, args.requests - args.requests // 2]
            results: dict[str, list[LoadResult]] = {"served": [], "in-process": []}
            for n in halves:
                results["served"].append(asyncio.run(served(url, headers, n, args.concurrency)))
                results["in-process"].append(asyncio.run(in_process(chain, n, args.concurrency)))
        finally:
            if server is not None:
                server.stop()
            if process is not None:
                process.terminate()
                process.wait(30)

    merged = {label: _merge(parts) for label, parts in results.items()}
    print(f"echo chain (one Python hop), server: {args.server}; Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs; {args.requests} requests each side at concurrency {args.concurrency}, "
          f"after {args.warmup} warm-up")
    print(HEADER)
    for result in merged.values():
        print(result.line())
    bad = {k: v for k, v in merged["served"].statuses.items() if k != 200}
    if bad:
        print(f"served non-200 answers by status (0: transport error): {bad}")
    s, p = merged["served"], merged["in-process"]
    ratios = [a.throughput / b.throughput for a, b in zip(results["served"], results["in-process"]) if b.throughput]
    print(f"served / in-process throughput: {s.throughput / p.throughput:.3f} "
          f"(halves: {', '.join(f'{r:.3f}' for r in ratios)}); p50 added {s.pct(0.5) - p.pct(0.5):.2f} ms, "
          f"p99 added {s.pct(0.99) - p.pct(0.99):.2f} ms; lost {s.lost}, mismatched {s.mismatched}")
    if s.lost or s.mismatched:
        sys.exit(1)


def _merge(parts: list[LoadResult]) -> LoadResult:
    statuses: dict[int, int] = {}
    for part in parts:
        for status, count in part.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    return LoadResult(parts[0].label, sum(p.requests for p in parts), parts[0].concurrency,
                      sum(p.wall_s for p in parts), [x for p in parts for x in p.latencies_ms], statuses,
                      sum(p.mismatched for p in parts), sum(p.lost for p in parts))


if __name__ == "__main__":
    main()
