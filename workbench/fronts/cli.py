"""The ``autoglm`` command line: the demo, running a chain spec file, and the span table."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from workbench.demo import DEMO_QUESTION
from workbench.errors import SpecError, WorkbenchError


def _print_run(run: object) -> None:
    import pandas as pd

    from workbench.chains.run import Run

    assert isinstance(run, Run)
    table = run.trace.compact()
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        print(f"\nrun {run.id} of chain {run.chain!r} in {run.duration_ms:.1f} ms")
        for hop, value in run.outputs.items():
            print(f"  {hop}: {value!r}")
        print("\nspans:")
        print(table.to_string(index=False))
        print("\nper hop:")
        print(run.trace.summary().to_string())


def _demo(args: argparse.Namespace) -> int:
    import workbench as wb
    from workbench.demo import DEMO_SPEC

    path = wb.tiny_model()
    print(f"tiny model: {path}")
    with wb.Workbench() as bench:
        model = bench.load("tiny", path, device=args.device)
        print(f"loaded 'tiny' on {model.device} ({model.params:,} parameters) in {model.load_s:.2f} s")
        chain = bench.chain(DEMO_SPEC)
        chain.run(question=args.question)  # warm-up: the first call pays one-off costs
        _print_run(chain.run(question=args.question))
    return 0


def _run(args: argparse.Namespace) -> int:
    import workbench as wb

    inputs = {}
    for pair in args.inputs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise WorkbenchError(f"input {pair!r} is not key=value", hint="e.g. question='What is 2+2?'")
        inputs[key] = value
    with open(args.spec, "rb") as handle:
        raw = handle.read()
    try:
        spec = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{args.spec} is not UTF-8 text: byte {raw[exc.start]:#04x} cannot be read",
                        line=raw.count(b"\n", 0, exc.start) + 1, hint="save the spec as UTF-8") from None
    with wb.Workbench(allow_modules=args.allow_module) as bench:
        for item in args.model:
            name, sep, source = item.partition("=")
            if not sep:
                raise WorkbenchError(f"--model {item!r} is not NAME=PATH", hint="e.g. --model tiny=/path/to/model")
            bench.load(name, wb.tiny_model() if source == "tiny" else source, device=args.device)
        run = bench.chain(spec).run(**inputs)
        if args.json:
            print(json.dumps({"id": run.id, "output": run.output, "outputs": run.outputs}, default=str, indent=2))
        else:
            _print_run(run)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoglm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the three-hop demo chain on the tiny model and print its spans")
    demo.add_argument("--question", default=DEMO_QUESTION)
    demo.add_argument("--device", default="auto")
    demo.set_defaults(func=_demo)
    run = sub.add_parser("run", help="run a chain spec file")
    run.add_argument("spec", help="a YAML chain spec")
    run.add_argument("inputs", nargs="*", help="chain inputs as key=value")
    run.add_argument("--model", action="append", default=[], help="NAME=PATH (PATH 'tiny' is the tiny model)")
    run.add_argument("--device", default="auto")
    run.add_argument("--json", action="store_true", help="print the outputs as JSON")
    run.add_argument("--allow-module", action="append", default=[], metavar="MODULE",
                     help="let the spec's call: name functions in MODULE (besides your own code); repeatable")
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (WorkbenchError, OSError) as exc:  # OSError: a spec path that is missing, a directory, unreadable
        print(f"autoglm: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
