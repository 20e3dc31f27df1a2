"""A remote hop against a hand-written async streaming client on the same OpenAI-compatible server.

By hand is the floor, written twice: with httpx (what the OpenAI SDK streams with) and with aiohttp
(what vLLM's serving benchmark streams with, and the workbench's remote backend too). Each is one
pooled client, one streamed ``POST /completions`` per request, the clock started just before the
POST, TTFT at the first chunk that carries a choice, E2E at the end of the stream (vLLM's serving
benchmark measures the same way). The workbench runs a one-hop chain on the same server
(``bench.load("remote", URL)``) through ``chain.run``: template, spans, the workbench's loop and
back. The three run interleaved, each round in the next of the six orders, so that each side
follows each other side equally often (a fixed cycle had put the workbench always right after the
httpx client), after warm-up rounds reported apart. The aiohttp client is the strict floor (the same HTTP client, so what is
left is the workbench's own cost); the httpx one shows what a researcher's usual client costs.

Per-request overhead is measured two ways. Paired: workbench E2E (``chain.run`` wall time) minus
the neighbouring by-hand E2E; on a shared CPU the server's own spread (tens of ms) swamps it.
Within one request: ``chain.run`` wall time minus the POST-to-end time the backend measured for
that same request (``workbench.remote.e2e_ms``), which is what the workbench adds around the
stream (template, spans, queue, hand-offs to the worker and the backend's loop and back) and
does not see the server's spread. TTFT compares the request span's ``ttft_ms`` (from the call
into the engine, so it counts the queue and the hand-offs) with the hand client's, pair by pair.
Then 256 concurrent streams go through ``chain.map(concurrency=256)`` under
``ContinuousBatching(256)``, and the errors are counted. The server started here runs with
``--continuous-batching``: without it `transformers serve` answers one request at a time, and
the last of 256 waits longer than the backend's 60 s read timeout for its first byte.

    python benchmarks/remote.py                         # starts `transformers serve` on the tiny model
    python benchmarks/remote.py --url http://127.0.0.1:8000/v1 --served-model m --pairs 200
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import torch
import transformers

import workbench as wb
from workbench.tracing import attributes as attr

PROMPT = "Question: What is the capital of France?\nAnswer:"


def start_server(model: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).parent / "transformers"), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--continuous-batching", model]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("transformers serve did not come up in 180 s")


def _body(model: str, max_tokens: int) -> dict[str, object]:
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}


async def _read(lines: AsyncIterator[bytes] | AsyncIterator[str], started: float) -> tuple[float, str]:
    """Read a completion's server-sent events: (TTFT ms at the first chunk with a choice, the text)."""
    texts, ttft = [], 0.0
    async for line in lines:
        if isinstance(line, bytes):
            line = line.decode()
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        choices = json.loads(line[5:]).get("choices")
        if choices:
            if not ttft:
                ttft = time.perf_counter() - started
            texts.append(choices[0].get("text") or "")
    return ttft * 1e3, "".join(texts).strip()


async def by_aiohttp(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int) -> tuple[float, float, str]:
    """One streamed completion with aiohttp, as vLLM's serving benchmark sends it: (TTFT ms, E2E ms, text)."""
    body = _body(model, max_tokens)
    started = time.perf_counter()
    async with session.post(f"{url}/completions", json=body) as response:
        response.raise_for_status()
        ttft, text = await _read(response.content, started)
    return ttft, (time.perf_counter() - started) * 1e3, text


async def by_httpx(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> tuple[float, float, str]:
    """One streamed completion with httpx (the OpenAI SDK's client): (TTFT ms, E2E ms, text)."""
    body = _body(model, max_tokens)
    started = time.perf_counter()
    async with client.stream("POST", f"{url}/completions", json=body) as response:
        response.raise_for_status()
        ttft, text = await _read(response.aiter_lines(), started)
    return ttft, (time.perf_counter() - started) * 1e3, text


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))  # made on the loop it runs on


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an OpenAI-compatible server's base URL (default: start transformers serve)")
    parser.add_argument("--served-model", help="the model's name on the server (default: the one it lists)")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrent", type=int, default=256)
    args = parser.parse_args()

    process = None
    url = args.url
    if url is None:
        process, url = start_server(str(wb.tiny_model()))
    try:
        with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
            loaded = bench.load("remote", url, served_model=args.served_model)
            model = str(loaded.settings.served_model)
            chain = bench.chain({"name": "remote", "hops": [{"name": "answer", "model": "remote", "prompt": PROMPT,
                                                             "max_new_tokens": args.max_tokens}], "output": "answer"})
            loop = asyncio.new_event_loop()
            client = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=None))
            session = loop.run_until_complete(_session())
            hands = {"aiohttp": lambda: by_aiohttp(session, url, model, args.max_tokens),
                     "httpx": lambda: by_httpx(client, url, model, args.max_tokens)}
            hand_ttft: dict[str, list[float]] = {name: [] for name in hands}
            hand_e2e: dict[str, list[float]] = {name: [] for name in hands}
            paired: dict[str, list[float]] = {name: [] for name in hands}
            wb_e2e, wb_ttft, added = [], [], []
            orders = list(itertools.permutations(["aiohttp", "httpx", "wb"]))
            try:
                for index in range(args.warmup + args.pairs):
                    measured: dict[str, tuple[float, float, str]] = {}
                    for side in orders[index % len(orders)]:
                        if side in hands:
                            measured[side] = loop.run_until_complete(hands[side]())
                        else:
                            started = time.perf_counter()
                            run = chain.run()
                            e2e = (time.perf_counter() - started) * 1e3
                            (span,) = [s for s in run.trace.spans if s.name.startswith("text_completion")]
                            measured[side] = (float(span.attributes[attr.TTFT_MS]), e2e, run.output)
                            inside = e2e - float(span.attributes[attr.REMOTE_E2E_MS])
                    for name in hands:
                        if measured[name][2] != measured["wb"][2]:
                            hand, ours = measured[name][2], measured["wb"][2]
                            raise SystemExit(f"different text: by hand ({name}) {hand!r}, workbench {ours!r}")
                    if index < args.warmup:
                        continue
                    for name in hands:
                        hand_ttft[name].append(measured[name][0])
                        hand_e2e[name].append(measured[name][1])
                        paired[name].append(measured["wb"][1] - measured[name][1])
                    wb_ttft.append(measured["wb"][0])
                    wb_e2e.append(measured["wb"][1])
                    added.append(inside)
            finally:
                loop.run_until_complete(client.aclose())
                loop.run_until_complete(session.close())
                loop.close()

            bench.set_batching("remote", wb.ContinuousBatching(max_batch=args.concurrent))
            started = time.perf_counter()
            batch = chain.map([{}] * args.concurrent, concurrency=args.concurrent)
            wall = time.perf_counter() - started
            errors = len(batch.failed) + len(batch.missing)

        print(f"server {url} model {model}; torch {torch.__version__}, transformers {transformers.__version__}; "
              f"{args.pairs} pairs after {args.warmup} warm-up, max_tokens {args.max_tokens}, greedy")
        print(f"{'':24}{'p50':>9}{'p95':>9}{'p99':>9}{'min':>9}{'max':>9}")
        rows = [(f"{name} by hand TTFT ms", hand_ttft[name]) for name in hands] + [("wb TTFT ms", wb_ttft)]
        rows += [(f"{name} by hand E2E ms", hand_e2e[name]) for name in hands] + [("wb E2E ms", wb_e2e)]
        rows += [(f"wb - {name} E2E ms", paired[name]) for name in hands] + [("wb added ms", added)]
        for label, values in rows:
            figures = (statistics.median(values), pct(values, .95), pct(values, .99), min(values), max(values))
            print(f"{label:24}" + "".join(f"{v:9.3f}" for v in figures))
        if args.pairs < 100:
            print("(p99 from fewer than 100 samples)")
        print(f"{args.concurrent} concurrent streams: {errors} errors, {wall:.2f} s, "
              f"{args.concurrent / wall:.1f} requests/s")
        for name in ("httpx", "aiohttp"):  # the strict floor last
            ratios = [w / h for w, h in zip(wb_ttft, hand_ttft[name])]
            print(f"TTFT workbench / {name} by hand: median {statistics.median(ratios):.3f} "
                  f"(min {min(ratios):.3f}, max {max(ratios):.3f}); paired E2E difference p50 "
                  f"{statistics.median(paired[name]):.3f} ms")
        print(f"per-request overhead (chain.run minus its own POST-to-end) p50 {statistics.median(added):.3f} ms "
              f"(min {min(added):.3f}, max {max(added):.3f})")
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)


if __name__ == "__main__":
    main()
