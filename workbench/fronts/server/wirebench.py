"""Measuring the gateway's wires: envelope formats side by side, and the same chains over REST/JSON, REST/msgpack, gRPC.

``formats()`` times encode + decode of the envelope's structs and counts their bytes, for JSON (stdlib and
msgspec), msgpack, each with zstd, and protobuf, over a small and a large payload. ``wires()`` serves a chain
that calls the model and a no-op chain (to isolate the wire) on one gateway, REST and gRPC, and drives each
wire with the same closed loop from a client process of its own, interleaved round by round, beside the same
runs in-process; the table sits next to the design's claimed figures. ``benchmarks/wire.py`` is the command
line; a notebook calls the same functions with small counts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import zstandard

from workbench.fronts.server import chain_pb2 as pb
from workbench.fronts.server.envelope import InvokeRequest, InvokeResponse

if TYPE_CHECKING:
    import pandas as pd

    from workbench.bench import Workbench
    from workbench.chains.chain import Chain

# The design we implement claims these for its internal services: (mean latency ms, requests/s).
CLAIMED = {"REST/JSON": (15.0, 1200.0), "gRPC/protobuf": (6.0, 3500.0)}
WIRES = ("REST/JSON", "REST/msgpack", "gRPC/protobuf")
IN_PROCESS = "in-process"
ZSTD_LEVEL = 3  # what the gateway compresses with (envelope.compress)

# The served chain: two LLM hops on the tiny model, few tokens, so the wire's share stays visible.
SERVED_SPEC = {
    "name": "served",
    "hops": [
        {"name": "plan", "model": "tiny", "prompt": "Question: {{ question }}\nPlan:", "max_new_tokens": 4},
        {"name": "answer", "model": "tiny", "prompt": "{{ plan }}\nAnswer:", "max_new_tokens": 4},
    ],
    "output": "answer",
}
QUESTION = {"question": "What is the capital of France?"}


def echo(question: str) -> str:
    """The no-op chain's one hop: hands its input back, so a call costs the wire and the runner, no model."""
    return question


# -- (1) envelope formats ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    """One way to put a payload on the wire: ``encode(struct) -> bytes`` and ``decode(bytes) -> struct``."""

    name: str
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


def codecs(kind: type) -> list[Codec]:
    """The formats compared for envelope struct ``kind`` (InvokeRequest or InvokeResponse).

    ``json (stdlib)`` does the same typed round trip as msgspec's: ``json`` for the text, ``msgspec.convert`` to
    check and build the struct. ``protobuf`` is the gRPC front's message, inputs and outputs as JSON text inside.
    """
    json_encoder, json_decoder = msgspec.json.Encoder(), msgspec.json.Decoder(kind)
    pack_encoder, pack_decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(kind)
    compressor, decompressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor()
    to_proto, from_proto = _PROTO[kind]
    return [
        Codec("json (stdlib)", lambda v: json.dumps(msgspec.to_builtins(v)).encode(),
              lambda b: msgspec.convert(json.loads(b), kind)),
        Codec("json (msgspec)", json_encoder.encode, json_decoder.decode),
        Codec("msgpack (msgspec)", pack_encoder.encode, pack_decoder.decode),
        Codec("json+zstd", lambda v: compressor.compress(json_encoder.encode(v)),
              lambda b: json_decoder.decode(decompressor.decompress(b))),
        Codec("msgpack+zstd", lambda v: compressor.compress(pack_encoder.encode(v)),
              lambda b: pack_decoder.decode(decompressor.decompress(b))),
        Codec("protobuf", lambda v: to_proto(v).SerializeToString(), lambda b: from_proto(b)),
    ]


def _request_to_proto(value: InvokeRequest) -> pb.InvokeRequest:
    return pb.InvokeRequest(
        envelope=pb.Envelope(trace_id=value.trace_id or "", context_blob=(value.context_blob or "").encode(),
                             action_type=value.action_type or ""),
        chain="qa", inputs_json=msgspec.json.encode(value.inputs).decode(), session_id=value.session_id or "")


def _request_from_proto(data: bytes) -> InvokeRequest:
    message = pb.InvokeRequest.FromString(data)
    return InvokeRequest(trace_id=message.envelope.trace_id, context_blob=message.envelope.context_blob.decode(),
                         action_type=message.envelope.action_type, inputs=msgspec.json.decode(message.inputs_json),
                         session_id=message.session_id or None)


def _response_to_proto(value: InvokeResponse) -> pb.InvokeResponse:
    return pb.InvokeResponse(
        envelope=pb.Envelope(trace_id=value.trace_id or "", context_blob=(value.context_blob or "").encode(),
                             action_type=value.action_type),
        run_id=value.run_id, output_json=msgspec.json.encode(value.output).decode(),
        outputs_json=msgspec.json.encode(value.outputs).decode(), duration_ms=value.duration_ms)


def _response_from_proto(data: bytes) -> InvokeResponse:
    message = pb.InvokeResponse.FromString(data)
    return InvokeResponse(run_id=message.run_id, chain="qa", status="ok",
                          output=msgspec.json.decode(message.output_json),
                          outputs=msgspec.json.decode(message.outputs_json), trace_id=message.envelope.trace_id,
                          duration_ms=message.duration_ms, context_blob=message.envelope.context_blob.decode(),
                          action_type=message.envelope.action_type)


_PROTO: dict[type, tuple[Callable[[Any], Any], Callable[[bytes], Any]]] = {
    InvokeRequest: (_request_to_proto, _request_from_proto),
    InvokeResponse: (_response_to_proto, _response_from_proto),
}


def payloads(seed: int = 0) -> dict[str, Any]:
    """A small request (one question, a short context) and a large response (three hops of ~10 KiB text each, a
    ~16 KiB context blob): words drawn from a vocabulary, so they compress as prose does, not as repeats do."""
    rng = random.Random(seed)
    words = [w for w in (
        "the model answers each question in a few steps and every hop reads the outputs of the hops before it "
        "while the gateway carries a session context that the caller keeps opaque capital france paris river "
        "latency throughput token batch queue replica span trace envelope compress decode encode"
    ).split()]

    def text(n_chars: int) -> str:
        out: list[str] = []
        size = 0
        while size < n_chars:
            word = rng.choice(words) + (str(rng.randrange(1000)) if rng.random() < 0.1 else "")
            out.append(word)
            size += len(word) + 1
        return " ".join(out)

    trace_id = f"{rng.getrandbits(128):032x}"
    small = InvokeRequest(trace_id=trace_id, context_blob="user=42;lang=en", action_type="invoke",
                          inputs=dict(QUESTION), session_id="s1")
    hops = {hop: text(10_000) for hop in ("plan", "draft", "answer")}
    large = InvokeResponse(run_id="0123456789ab", chain="qa", status="ok", output=hops["answer"], outputs=hops,
                           trace_id=trace_id, duration_ms=123.4, context_blob=text(16_000), action_type="invoke")
    return {"small request": small, "large response": large}


def formats(repeats: int = 5, number: int = 200, seed: int = 0) -> pd.DataFrame:
    """Encode + decode time per payload and format (median µs over ``repeats`` rounds of ``number`` each, with
    min and max), the bytes on the wire, and time and bytes relative to stdlib JSON. Formats run interleaved,
    in a new order each round."""
    import pandas as pd

    rows = []
    for label, value in payloads(seed).items():
        kind = type(value)
        table = codecs(kind)
        for codec in table:  # each must give the payload back
            if codec.decode(codec.encode(value)) != value:
                raise AssertionError(f"{codec.name} does not round-trip the {label}")
        times: dict[str, list[float]] = {c.name: [] for c in table}
        encode_times: dict[str, list[float]] = {c.name: [] for c in table}
        for round_ in range(repeats):
            for codec in _rotated(table, round_):
                started = time.perf_counter()
                for _ in range(number):
                    data = codec.encode(value)
                encoded = time.perf_counter()
                for _ in range(number):
                    codec.decode(data)
                done = time.perf_counter()
                encode_times[codec.name].append((encoded - started) / number * 1e6)
                times[codec.name].append((done - started) / number * 1e6)
        base_us = statistics.median(times["json (stdlib)"])
        base_bytes = len(table[0].encode(value))
        for codec in table:
            size = len(codec.encode(value))
            median = statistics.median(times[codec.name])
            rows.append({
                "payload": label, "format": codec.name, "bytes": size,
                "encode_us": statistics.median(encode_times[codec.name]),
                "encode_decode_us": median, "min_us": min(times[codec.name]), "max_us": max(times[codec.name]),
                "time_vs_stdlib_json": median / base_us, "bytes_vs_stdlib_json": size / base_bytes,
            })
    return pd.DataFrame(rows)


# -- (2) the wires ---------------------------------------------------------------------------------


@dataclass
class WireResults:
    """Latencies of every measured call and requests/s of every block, by (chain, wire)."""

    latencies_ms: dict[tuple[str, str], list[float]]
    throughput: dict[tuple[str, str], list[float]]
    p50_ratios: dict[str, list[float]]  # chain -> per round: REST/JSON p50 / gRPC p50
    errors: dict[tuple[str, str], int]
    settings: dict[str, Any]

    def table(self) -> pd.DataFrame:
        """One row per chain and wire: calls, mean, p50, p99 (ms), req/s (median of rounds, min, max), errors,
        beside the design's claimed mean latency and req/s."""
        import numpy as np
        import pandas as pd

        rows = []
        for (chain, wire), latencies in self.latencies_ms.items():
            rates = self.throughput[(chain, wire)]
            claimed = CLAIMED.get(wire, (None, None))
            rows.append({
                "chain": chain, "wire": wire, "calls": len(latencies),
                "mean_ms": float(np.mean(latencies)), "p50_ms": float(np.percentile(latencies, 50)),
                "p99_ms": float(np.percentile(latencies, 99)), "p99_flag": "n<100" if len(latencies) < 100 else "",
                "req_s": statistics.median(rates), "req_s_min": min(rates), "req_s_max": max(rates),
                "errors": self.errors.get((chain, wire), 0),
                "claimed_mean_ms": claimed[0], "claimed_req_s": claimed[1],
            })
        return pd.DataFrame(rows)

    def headline(self) -> str:
        """The last line a benchmark prints: gRPC's p50 against REST/JSON's, per chain (median of rounds)."""
        parts = []
        for chain, ratios in self.p50_ratios.items():
            if ratios:
                parts.append(f"{chain}: REST/JSON p50 / gRPC p50 = {statistics.median(ratios):.2f} "
                             f"[{min(ratios):.2f}, {max(ratios):.2f}] over {len(ratios)} rounds")
        return "; ".join(parts) + " (design claims 15/6 = 2.50)"


def wires(
    bench: Workbench | None = None,
    *,
    requests: int = 200,
    concurrency: int = 16,
    rounds: int = 3,
    warmup: int = 16,
    chains: tuple[Chain, Chain] | None = None,
) -> WireResults:
    """The table of the issue: a served chain and a no-op chain over REST/JSON, REST/msgpack and gRPC/protobuf.

    One gateway (``bench.serve(..., grpc_port=0)``, a real API key, no rate limit) serves both chains; a client
    process of its own runs ``requests`` calls per block, ``concurrency`` in flight (a closed loop), after
    ``warmup`` calls that are not counted; the blocks of a round run every chain and wire, in a new order each
    round, and ``in-process`` (``chain.arun`` at the same concurrency, in this process) is the floor.
    ``bench`` None loads the tiny model (CPU, dynamic batching up to 16, 5 ms wait) into a new Workbench, closed
    at the end; ``chains`` gives your own (served, no-op) pair instead of the built-in ones.
    """
    from workbench.fronts.server.auth import Auth

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:  # a notebook cell runs inside a loop: measure from a thread of its own, where nothing else runs
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wirebench") as pool:
            return pool.submit(wires, bench, requests=requests, concurrency=concurrency, rounds=rounds,
                               warmup=warmup, chains=chains).result()
    with _bench(bench) as host:
        served, noop = chains if chains is not None else (
            host.chain(SERVED_SPEC), host.chain({"name": "noop", "hops": [{"name": "echo", "call": echo}]}))
        with tempfile.TemporaryDirectory(prefix="wirebench-") as keys_dir:
            auth = Auth(keys_dir, rate_per_s=None)
            key = auth.keys.add("wirebench", "runner")
            with host.serve(chains=[served, noop], port=0, grpc_port=0, auth=auth) as server, \
                    ProcessPoolExecutor(1, mp_context=_spawn()) as client:
                targets = {"REST/JSON": server.url, "REST/msgpack": server.url, "gRPC/protobuf": server.grpc.target}
                latencies: dict[tuple[str, str], list[float]] = {}
                throughput: dict[tuple[str, str], list[float]] = {}
                errors: dict[tuple[str, str], int] = {}
                ratios: dict[str, list[float]] = {served.name: [], noop.name: []}
                for round_ in range(rounds):
                    for chain in (noop, served):
                        p50: dict[str, float] = {}
                        for wire in _rotated((*WIRES, IN_PROCESS), round_):
                            inputs = dict(QUESTION)
                            if wire == IN_PROCESS:
                                block = asyncio.run(_in_process(chain, inputs, requests, concurrency, warmup))
                            else:
                                block = client.submit(drive, wire, targets[wire], chain.name, inputs, key, requests,
                                                      concurrency, warmup).result()
                            latencies.setdefault((chain.name, wire), []).extend(block["latencies_ms"])
                            throughput.setdefault((chain.name, wire), []).append(block["req_s"])
                            errors[(chain.name, wire)] = errors.get((chain.name, wire), 0) + block["errors"]
                            p50[wire] = statistics.median(block["latencies_ms"]) if block["latencies_ms"] else 0.0
                        if p50.get("gRPC/protobuf"):
                            ratios[chain.name].append(p50["REST/JSON"] / p50["gRPC/protobuf"])
        settings = {"requests": requests, "concurrency": concurrency, "rounds": rounds, "warmup": warmup,
                    "served_chain": served.name, "noop_chain": noop.name}
        return WireResults(latencies, throughput, ratios, errors, settings)


def drive(wire: str, target: str, chain: str, inputs: dict[str, Any], key: str, requests: int, concurrency: int,
          warmup: int) -> dict[str, Any]:
    """One block of calls on one wire, from this (client) process: latencies of the ``requests`` measured calls,
    their requests/s, and how many failed. Every answer is checked to be the run of its own request."""
    return asyncio.run(_drive(wire, target, chain, inputs, key, requests, concurrency, warmup))


async def _drive(wire: str, target: str, chain: str, inputs: dict[str, Any], key: str, requests: int,
                 concurrency: int, warmup: int) -> dict[str, Any]:
    async with _caller(wire, target, chain, key, concurrency) as call:
        return await _closed_loop(call, inputs, requests, concurrency, warmup)


@contextmanager
def _bench(bench: Workbench | None) -> Iterator[Workbench]:
    if bench is not None:
        yield bench
        return
    from workbench.bench import Workbench
    from workbench.engine import DynamicBatching
    from workbench.models.tiny import tiny_model

    with Workbench() as fresh:
        # Batched, as a served model under concurrent callers would be: the served chain's calls share batches.
        fresh.load("tiny", tiny_model(), device="cpu", batching=DynamicBatching(max_batch=16, max_wait_ms=5))
        yield fresh


class _caller:
    """An async context giving ``call(inputs) -> output`` over one wire (one client, connections reused)."""

    def __init__(self, wire: str, target: str, chain: str, key: str, concurrency: int) -> None:
        self.wire, self.target, self.chain, self.key, self.concurrency = wire, target, chain, key, concurrency

    async def __aenter__(self) -> Callable[[dict[str, Any]], Any]:
        if self.wire == "gRPC/protobuf":
            import grpc

            from workbench.fronts.server import chain_pb2_grpc

            self._channel = grpc.aio.insecure_channel(self.target)
            stub = chain_pb2_grpc.ChainServiceStub(self._channel)
            metadata = (("authorization", f"Bearer {self.key}"),)

            async def call(inputs: dict[str, Any]) -> Any:
                request = pb.InvokeRequest(chain=self.chain, inputs_json=msgspec.json.encode(inputs).decode())
                response = await stub.Invoke(request, metadata=metadata, timeout=120)
                return msgspec.json.decode(response.output_json)

            return call
        import socket

        import httpx

        # TCP_NODELAY, as the gateway's own sockets have it: a request sent in more than one write must not wait
        # for a delayed ACK (~40 ms on Linux loopback) under Nagle's algorithm.
        transport = httpx.AsyncHTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency))
        self._client = httpx.AsyncClient(base_url=self.target, timeout=120, transport=transport)
        url = f"/v1/chains/{self.chain}/invoke"
        if self.wire == "REST/msgpack":
            headers = {"authorization": f"Bearer {self.key}", "content-type": "application/msgpack",
                       "accept": "application/msgpack"}
            encode, decode = msgspec.msgpack.encode, msgspec.msgpack.decode
        else:
            headers = {"authorization": f"Bearer {self.key}", "content-type": "application/json",
                       "accept": "application/json"}
            encode, decode = msgspec.json.encode, msgspec.json.decode

        async def post(inputs: dict[str, Any]) -> Any:
            response = await self._client.post(url, content=encode({"inputs": inputs}), headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{self.wire}: HTTP {response.status_code}: {response.text[:200]}")
            return decode(response.content)["output"]

        return post

    async def __aexit__(self, *exc: object) -> None:
        if self.wire == "gRPC/protobuf":
            await self._channel.close()
        else:
            await self._client.aclose()


async def _in_process(chain: Chain, inputs: dict[str, Any], requests: int, concurrency: int,
                      warmup: int) -> dict[str, Any]:
    async def call(each: dict[str, Any]) -> Any:
        return (await chain.arun(**each)).output

    return await _closed_loop(call, inputs, requests, concurrency, warmup)


async def _closed_loop(call: Callable[[dict[str, Any]], Any], inputs: dict[str, Any], requests: int,
                       concurrency: int, warmup: int) -> dict[str, Any]:
    """``requests`` calls, ``concurrency`` in flight, each with its own numbered input (so an answer mixed up with
    another request's shows); ``warmup`` calls first, not counted."""
    numbered = "question" in inputs

    async def one(index: int, latencies: list[float] | None, failures: list[int]) -> None:
        each = dict(inputs)
        if numbered:
            each["question"] = f"{inputs['question']} #{index}"
        started = time.perf_counter()
        try:
            output = await call(each)
        except Exception:
            failures.append(index)
            return
        if latencies is not None:
            latencies.append((time.perf_counter() - started) * 1e3)
        if isinstance(output, str) and output.startswith(inputs.get("question", "\0")) and output != each["question"]:
            failures.append(index)  # an echo of another request's input: a mixed-up answer

    async def run(count: int, latencies: list[float] | None, failures: list[int]) -> None:
        queue = iter(range(count))

        async def worker() -> None:
            for index in queue:
                await one(index, latencies, failures)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))

    await run(warmup, None, [])
    latencies: list[float] = []
    failures: list[int] = []
    started = time.perf_counter()
    await run(requests, latencies, failures)
    wall = time.perf_counter() - started
    return {"latencies_ms": latencies, "req_s": requests / wall, "errors": len(failures)}


def _rotated(items: Any, round_: int) -> list[Any]:
    items = list(items)
    shift = round_ % len(items)
    return items[shift:] + items[:shift]


def _spawn() -> Any:
    import multiprocessing
    import sys

    # spawn reads __main__.__spec__ to prepare the child; IPython's shell puts a __main__ there without one.
    main = sys.modules.get("__main__")
    if main is not None and not hasattr(main, "__spec__"):
        main.__spec__ = None
    return multiprocessing.get_context("spawn")
