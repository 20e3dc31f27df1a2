"""The channel to a model process: round trip of a batch's token ids and its results, per candidate channel.

A child process answers each request frame with a results frame shaped like a batch's
(per row: text, generated token ids, finish reason, four timings, padding). Candidates:

    pipe+msgpack   a socket pair wrapped in multiprocessing's Connection, send_bytes/recv_bytes of msgpack
                   (what isolation="process" uses)
    pipe+json      the same pipe, JSON frames (no extra dependency)
    zmq+msgpack    ZeroMQ PAIR sockets over ipc://, msgpack frames
    shm+msgpack    a shared-memory ring (multiprocessing.shared_memory, one slot each way) with msgpack
                   frames, each side polling a sequence number (no system call per message; burns CPU
                   while it waits, and on a shared 2-core machine that is the cost that matters)

Channels run interleaved in one run (round robin, after a warm-up round reported apart); each
round is ``--trips`` round trips per channel. Reported: median and p95 per round trip in
microseconds over all trips, and the median over rounds of each channel / pipe+msgpack. Nothing is
left in /dev/shm: the ring's segments are unlinked at the end, and the script checks.

    python benchmarks/ipc.py                      # 64 rows of 64 prompt ids, 32 new ids each
    python benchmarks/ipc.py --rows 1 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import zmq

SLOT = 8 << 20  # bytes per ring slot: far more than a 64-row batch's frame
_HEADER = struct.Struct("<QQ")  # sequence number, frame length


def request(rows: int, prompt: int, seed: int) -> dict[str, Any]:
    ids = [[(seed * 7919 + row * 31 + i) % 4096 for i in range(prompt)] for row in range(rows)]
    return {"op": "generate", "params": {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                         "seed": None, "truncate": "error"},
            "rows": [[row_ids, 12345.678 + row, False] for row, row_ids in enumerate(ids)]}


def reply(frame: dict[str, Any], new: int) -> dict[str, Any]:
    results = [[f"answer {i} " * 6, [(t + 1) % 4096 for t in ids[:new]], "length", 1.25, 3.5, 4.75, 30.0, 0]
               for i, (ids, _, _) in enumerate(frame["rows"])]
    return {"op": "done", "results": results, "busy_ms": 1.0,
            "timing": {"size": len(results), "padded_len": 64, "padding_tokens": 0, "started": 1.0,
                       "prefill_ms": 3.5, "decode_ms": 30.0, "detokenize_ms": 0.5, "steps": new}}


CODECS: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    "msgpack": (lambda f: msgpack.packb(f, use_bin_type=True), lambda b: msgpack.unpackb(b, raw=False)),
    "json": (lambda f: json.dumps(f, separators=(",", ":")).encode(), json.loads),
}


# -- the child: answers frames until the channel closes ------------------------------------------


def serve(kind: str, address: str, codec: str, new: int) -> None:
    pack, unpack = CODECS[codec]
    if kind == "pipe":
        conn = Connection(int(address))
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                return
            conn.send_bytes(pack(reply(unpack(data), new)))
    elif kind == "zmq":
        context = zmq.Context()
        sock = context.socket(zmq.PAIR)
        sock.connect(address)
        while True:
            data = sock.recv()
            if not data:
                break
            sock.send(pack(reply(unpack(data), new)))
        sock.close(0)
        context.term()
    else:
        inbox, outbox = (shared_memory.SharedMemory(name) for name in address.split(","))
        for segment in (inbox, outbox):
            # Before 3.13 attaching registers the segment with this process's resource tracker, which would
            # unlink it when this process ends; the parent created it and unlinks it.
            resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
        seen = 0
        while True:
            data, seen = ring_read(inbox, seen)
            if not data:
                break
            ring_write(outbox, seen, pack(reply(unpack(data), new)))
        inbox.close()
        outbox.close()


def ring_write(slot: shared_memory.SharedMemory, seq: int, data: bytes) -> None:
    """Write ``data`` into the slot, then publish it by bumping the sequence number (written last)."""
    slot.buf[_HEADER.size:_HEADER.size + len(data)] = data
    slot.buf[:_HEADER.size] = _HEADER.pack(seq, len(data))


def ring_read(slot: shared_memory.SharedMemory, seen: int) -> tuple[bytes, int]:
    """Poll until the slot holds a frame newer than ``seen``; the frame and its sequence number."""
    while True:
        seq, length = _HEADER.unpack_from(slot.buf, 0)
        if seq > seen:
            return bytes(slot.buf[_HEADER.size:_HEADER.size + length]), seq
        time.sleep(0)  # yield the core: spinning flat out would starve the other side on 2 cores


# -- the parent: one round-trip function per channel ------------------------------------------------


class Channel:
    def __init__(self, name: str, kind: str, codec: str, new: int) -> None:
        self.name, self.kind = name, kind
        self.pack, self.unpack = CODECS[codec]
        argv = [sys.executable, __file__, "--serve", kind, "--codec", codec, "--new", str(new)]
        self._segments: list[shared_memory.SharedMemory] = []
        if kind == "pipe":
            ours, theirs = socket.socketpair()
            with theirs:
                self.proc = subprocess.Popen([*argv, "--address", str(theirs.fileno())], pass_fds=(theirs.fileno(),))
            self.conn = Connection(ours.detach())
        elif kind == "zmq":
            self.dir = tempfile.mkdtemp(prefix="autoglm-ipc-")
            address = f"ipc://{self.dir}/bench"
            self.context = zmq.Context()
            self.sock = self.context.socket(zmq.PAIR)
            self.sock.bind(address)
            self.proc = subprocess.Popen([*argv, "--address", address])
        else:
            self._segments = [shared_memory.SharedMemory(create=True, size=SLOT) for _ in range(2)]
            for segment in self._segments:
                segment.buf[:_HEADER.size] = _HEADER.pack(0, 0)
            self.seq = 0
            self.proc = subprocess.Popen([*argv, "--address", ",".join(s.name for s in self._segments)])

    def trip(self, frame: dict[str, Any]) -> dict[str, Any]:
        data = self.pack(frame)
        if self.kind == "pipe":
            self.conn.send_bytes(data)
            return self.unpack(self.conn.recv_bytes())
        if self.kind == "zmq":
            self.sock.send(data)
            return self.unpack(self.sock.recv())
        self.seq += 1
        ring_write(self._segments[0], self.seq, data)
        answer, _ = ring_read(self._segments[1], self.seq - 1)
        return self.unpack(answer)

    def close(self) -> None:
        if self.kind == "pipe":
            self.conn.close()
        elif self.kind == "zmq":
            self.sock.send(b"")
            self.sock.close(linger=5000)  # the empty frame that ends the child must go out first
            self.context.term()
        else:
            self.seq += 1
            ring_write(self._segments[0], self.seq, b"")
        self.proc.wait(30)
        if self.kind == "zmq":
            for name in os.listdir(self.dir):
                os.unlink(os.path.join(self.dir, name))
            os.rmdir(self.dir)
        for segment in self._segments:
            segment.close()
            segment.unlink()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows (requests) per batch")
    parser.add_argument("--prompt", type=int, default=64, help="prompt token ids per row")
    parser.add_argument("--new", type=int, default=32, help="generated token ids per row")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--trips", type=int, default=200, help="round trips per channel per round")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--codec", default="msgpack", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.address, args.codec, args.new)
        return

    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    frames = [request(args.rows, args.prompt, seed) for seed in range(16)]
    channels = [Channel("pipe+msgpack", "pipe", "msgpack", args.new), Channel("pipe+json", "pipe", "json", args.new),
                Channel("zmq+msgpack", "zmq", "msgpack", args.new), Channel("shm+msgpack", "shm", "msgpack", args.new)]
    try:
        for channel in channels:  # warm-up round, reported apart
            started = time.perf_counter()
            channel.trip(frames[0])
            print(f"cold {channel.name}: first round trip {(time.perf_counter() - started) * 1e6:.0f} us")
        replies = [reply(frame, args.new) for frame in frames]
        codec_us = {}
        for name, (pack, unpack) in CODECS.items():  # what the frames cost to make and read, with no channel
            started = time.perf_counter()
            for i in range(args.trips):
                unpack(pack(frames[i % 16]))
                unpack(pack(replies[i % 16]))
            codec_us[name] = (time.perf_counter() - started) / args.trips * 1e6
        trips: dict[str, list[float]] = {c.name: [] for c in channels}
        rounds: dict[str, list[float]] = {c.name: [] for c in channels}
        for r in range(args.rounds):
            order = channels[r % len(channels):] + channels[:r % len(channels)]
            for channel in order:
                times = []
                for i in range(args.trips):
                    started = time.perf_counter()
                    answer = channel.trip(frames[i % 16])
                    times.append((time.perf_counter() - started) * 1e6)
                    assert len(answer["results"]) == args.rows
                trips[channel.name] += times
                rounds[channel.name].append(statistics.median(times))
    finally:
        for channel in channels:
            channel.close()
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()

    print(f"\nbatch: {args.rows} rows x {args.prompt} prompt ids -> {args.new} new ids + text + timings per row; "
          f"{args.rounds} rounds x {args.trips} trips per channel, interleaved; python {sys.version.split()[0]}, "
          f"msgpack {'.'.join(map(str, msgpack.version))}, pyzmq {zmq.__version__}")
    print(f"encode+decode alone, both ways, in one process: msgpack {codec_us['msgpack']:.0f} us, "
          f"json {codec_us['json']:.0f} us")
    base = rounds["pipe+msgpack"]
    print(f"{'channel':<14}{'p50 us':>10}{'p95 us':>10}{'vs pipe+msgpack (median [min, max] over rounds)':>50}")
    for channel in channels:
        ratios = [a / b for a, b in zip(rounds[channel.name], base)]
        print(f"{channel.name:<14}{statistics.median(trips[channel.name]):>10.0f}"
              f"{percentile(trips[channel.name], 0.95):>10.0f}"
              f"{statistics.median(ratios):>30.2f} [{min(ratios):.2f}, {max(ratios):.2f}]")
    print(f"/dev/shm: {len(shm_after - shm_before)} entries left behind")
    p50 = {name: statistics.median(values) for name, values in trips.items()}
    # The headline ratio is the table's: per round (the channels ran side by side), median [min, max].
    per_round = {name: [a / b for a, b in zip(values, base)] for name, values in rounds.items()}
    fastest = min(per_round, key=lambda name: statistics.median(per_round[name]))
    ratios = per_round[fastest]
    print(f"headline: pipe+msgpack round trip {p50['pipe+msgpack']:.0f} us (p50); fastest {fastest} "
          f"{p50[fastest]:.0f} us = {statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}] x "
          f"pipe+msgpack (median [min, max] over {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
