"""What serving adds: a chain called over loopback HTTP (the gateway, REST/JSON and REST/msgpack) against the same
chain awaited in-process (``await chain.arun(...)``).

Two chains: ``noop``, one Python hop that returns at once (``workbench.demo:canned_answer``), so
the difference is the wire and the gateway alone (auth with a real API key, body decoding,
validation, the run slot, the response); and ``tiny``, one LLM hop of 4 tokens on the offline
tiny model, a served chain that does real work. The three ways run interleaved in one process,
one request at a time, the order rotating each round, after warm-up rounds reported apart. The
client is one pooled ``httpx.AsyncClient`` on the benchmark's own event loop (its cost counts: a
caller pays it too).

``--frameworks`` also times the web framework alone: a no-op POST route that validates a small
body and answers it, on plain Starlette with msgspec (what the gateway is built on) and on
FastAPI with a pydantic model, each on uvicorn over loopback, interleaved.

Latency is end to end per call, in ms, as p50 [p25, p75] and p99. The headline, printed last, is
the median over rounds of (served - in-process) for REST/JSON on ``noop``: the gateway's added
latency at p50 (goal: <= 2 ms on loopback).

    python benchmarks/served.py                  # 200 rounds of noop, 50 of tiny, CPU
    python benchmarks/served.py --rounds 1000 --tiny-rounds 0 --frameworks
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgspec
import pydantic
import torch
import transformers

import workbench as wb
from workbench.fronts.server.auth import Auth, KeyStore

NOOP = {"name": "noop", "hops": [{"name": "answer", "call": "workbench.demo:canned_answer"}]}
TINY = {"name": "tiny", "hops": [{"name": "answer", "model": "tiny", "prompt": "Question: {{ question }}\nAnswer:",
                                  "max_new_tokens": 4}]}
QUESTION = "What is 2 + 2?"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def spread(values: list[float]) -> str:
    return (f"p50 {statistics.median(values):7.3f}  [p25 {percentile(values, 0.25):7.3f}, "
            f"p75 {percentile(values, 0.75):7.3f}]  p99 {percentile(values, 0.99):7.3f}")


async def measure(chain: wb.Chain, url: str, key: str, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Per-call latency (ms) of each way, interleaved with the order rotating each round."""
    headers = {"authorization": f"Bearer {key}"}
    body = {"inputs": {"question": QUESTION}}
    packed = msgspec.msgpack.encode(body)
    msgpack_headers = {**headers, "content-type": "application/msgpack", "accept": "application/msgpack"}
    invoke = f"{url}/v1/chains/{chain.name}/invoke"
    async with httpx.AsyncClient(timeout=60) as client:

        async def in_process() -> Any:
            return (await chain.arun(question=QUESTION)).output

        async def rest_json() -> Any:
            response = await client.post(invoke, json=body, headers=headers)
            response.raise_for_status()
            return response.json()["output"]

        async def rest_msgpack() -> Any:
            response = await client.post(invoke, content=packed, headers=msgpack_headers)
            response.raise_for_status()
            return msgspec.msgpack.decode(response.content)["output"]

        ways: dict[str, Callable[[], Awaitable[Any]]] = {
            "in-process": in_process, "REST/JSON": rest_json, "REST/msgpack": rest_msgpack,
        }
        outputs = {name: await way() for name, way in ways.items()}
        if len(set(map(str, outputs.values()))) != 1:
            raise SystemExit(f"the ways disagree on the output: {outputs}")
        times: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        for round_ in range(warmup + rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                started = time.perf_counter()
                await ways[name]()
                if round_ >= warmup:
                    times[name].append((time.perf_counter() - started) * 1e3)
        return times


def report(label: str, times: dict[str, list[float]]) -> float:
    print(f"\n{label}: {len(times['in-process'])} rounds, ms per call")
    for name, values in times.items():
        print(f"  {name:<13} {spread(values)}")
    if len(times["in-process"]) < 100:
        print("  (p99 from fewer than 100 samples)")
    added = 0.0
    for name in ("REST/JSON", "REST/msgpack"):
        diffs = [s - i for s, i in zip(times[name], times["in-process"])]
        median = statistics.median(diffs)
        print(f"  added by {name:<13} p50 {median:7.3f}  [p25 {percentile(diffs, 0.25):7.3f}, "
              f"p75 {percentile(diffs, 0.75):7.3f}]")
        if name == "REST/JSON":
            added = median
    return added


class Echo(msgspec.Struct):
    inputs: dict[str, str]


class EchoModel(pydantic.BaseModel):  # at module level: FastAPI resolves the route's annotations here
    inputs: dict[str, str]


def framework_apps() -> dict[str, Any]:
    """The same no-op route (validate ``{"inputs": {...}}``, answer it) on Starlette + msgspec and on FastAPI."""
    from fastapi import FastAPI
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def starlette_echo(request: Request) -> Response:
        body = msgspec.json.decode(await request.body(), type=Echo)
        return Response(msgspec.json.encode({"output": body.inputs}), media_type="application/json")

    fastapi_app = FastAPI()

    @fastapi_app.post("/echo")
    async def fastapi_echo(body: EchoModel) -> dict[str, Any]:
        return {"output": body.inputs}

    return {"Starlette+msgspec": Starlette(routes=[Route("/echo", starlette_echo, methods=["POST"])]),
            "FastAPI+pydantic": fastapi_app}


async def measure_frameworks(urls: dict[str, str], rounds: int, warmup: int) -> dict[str, list[float]]:
    body = {"inputs": {"question": QUESTION}}
    times: dict[str, list[float]] = {name: [] for name in urls}
    names = list(urls)
    async with httpx.AsyncClient(timeout=60) as client:
        for round_ in range(warmup + rounds):
            for name in names[round_ % 2:] + names[:round_ % 2]:
                started = time.perf_counter()
                (await client.post(urls[name], json=body)).raise_for_status()
                if round_ >= warmup:
                    times[name].append((time.perf_counter() - started) * 1e3)
    return times


def frameworks(rounds: int, warmup: int) -> None:
    import socket
    import threading

    import uvicorn

    servers, urls = [], {}
    for name, app in framework_apps().items():
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.01)
        servers.append(server)
        urls[name] = f"http://127.0.0.1:{sock.getsockname()[1]}/echo"
    times = asyncio.run(measure_frameworks(urls, rounds, warmup))
    print(f"\nthe framework alone (a no-op POST route on uvicorn): {rounds} rounds, ms per call")
    for name, values in times.items():
        print(f"  {name:<18} {spread(values)}")
    diffs = [f - s for f, s in zip(times["FastAPI+pydantic"], times["Starlette+msgspec"])]
    print(f"  FastAPI - Starlette p50 {statistics.median(diffs):7.3f}  [p25 {percentile(diffs, 0.25):7.3f}, "
          f"p75 {percentile(diffs, 0.75):7.3f}]")
    for server in servers:
        server.should_exit = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="measured rounds of the noop chain")
    parser.add_argument("--tiny-rounds", type=int, default=50, help="measured rounds of the tiny chain (0: skip)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="a model directory (default: the offline tiny model)")
    parser.add_argument("--frameworks", action="store_true", help="also time Starlette against FastAPI alone")
    args = parser.parse_args()
    if args.frameworks:
        frameworks(args.rounds, args.warmup)

    data = tempfile.mkdtemp(prefix="served-bench-")
    key = KeyStore(data).add("bench", "runner")
    with wb.Workbench(data_dir=data) as bench:
        model = bench.load("tiny", args.model or wb.tiny_model(), device=args.device)
        noop, tiny = bench.chain(NOOP), bench.chain(TINY)
        auth = Auth(data, rate_per_s=None)  # a real key check per call; no rate limit in the way
        with bench.serve(chains=[noop, tiny], port=0, auth=auth) as server:
            print(f"gateway {server.url}; model {model.source} on {model.device} ({model.params:,} parameters), "
                  f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
                  f"{transformers.__version__}, {os.cpu_count()} CPUs; one call at a time, {args.warmup} warm-up "
                  "rounds not counted")
            if args.tiny_rounds:
                report("tiny (one LLM hop, 4 tokens)",
                       asyncio.run(measure(tiny, server.url, key, args.tiny_rounds, args.warmup)))
            added = report("noop (one Python hop)", asyncio.run(measure(noop, server.url, key, args.rounds,
                                                                          args.warmup)))
    print(f"\nadded by the gateway at p50, REST/JSON on loopback, noop chain: {added:.3f} ms (goal <= 2 ms)")


if __name__ == "__main__":
    main()
