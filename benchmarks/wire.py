"""The gateway's wires: envelope formats side by side, then a served and a no-op chain over REST/JSON, REST/msgpack
and gRPC/protobuf, beside the same runs in-process and the design's claimed figures.

(1) Encode + decode time and bytes of the envelope's structs (a small request, a large response) as stdlib JSON,
msgspec JSON, msgspec msgpack, each with zstd, and protobuf. (2) One gateway (``bench.serve(..., grpc_port=0)``,
a real API key) serves a two-hop chain on the tiny model and a one-hop no-op chain; a client process of its own
drives each wire in a closed loop at a fixed concurrency, the wires interleaved in a new order each round;
``in-process`` is ``chain.arun`` at the same concurrency. Printed whatever the numbers say. The measuring code
is ``workbench.fronts.server.wirebench``, which a notebook cell calls with small counts.

    python benchmarks/wire.py                                   # 200 calls a block, concurrency 16, 3 rounds
    python benchmarks/wire.py --requests 50 --rounds 2          # quicker
    python benchmarks/wire.py --skip-wires                      # formats only
"""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import version

import pandas as pd

from workbench.fronts.server import wirebench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="measured calls per block (chain x wire x round)")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight at once (closed loop)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every chain and wire once")
    parser.add_argument("--warmup", type=int, default=16, help="calls before each block, not counted")
    parser.add_argument("--format-repeats", type=int, default=7, help="rounds of the format comparison")
    parser.add_argument("--format-number", type=int, default=200, help="encodes and decodes per format and round")
    parser.add_argument("--skip-formats", action="store_true")
    parser.add_argument("--skip-wires", action="store_true")
    args = parser.parse_args()

    packages = ", ".join(f"{name} {version(name)}" for name in
                         ("grpcio", "protobuf", "msgspec", "zstandard", "uvicorn", "starlette", "httpx", "torch"))
    print(f"Python {platform.python_version()} on {platform.machine()}; {packages}")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        if not args.skip_formats:
            print(f"\n(1) envelope formats: median of {args.format_repeats} rounds of {args.format_number} "
                  "encode + decode each, interleaved")
            table = wirebench.formats(repeats=args.format_repeats, number=args.format_number)
            print(table.to_string(index=False))
        if not args.skip_wires:
            print(f"\n(2) wires: {args.requests} calls a block at concurrency {args.concurrency}, "
                  f"{args.rounds} rounds, {args.warmup} warm-up calls a block; tiny model on the CPU, "
                  "dynamic batching 16 / 5 ms; client in its own process")
            results = wirebench.wires(requests=args.requests, concurrency=args.concurrency, rounds=args.rounds,
                                      warmup=args.warmup)
            print(results.table().to_string(index=False, na_rep="-"))  # "-": no claimed figure for that wire
            print(results.headline())


if __name__ == "__main__":
    main()
