"""Regenerate chain_pb2.py and chain_pb2_grpc.py from chain.proto, or check that the committed ones are up to date.

    python -m workbench.fronts.server.protogen           # rewrite the generated modules
    python -m workbench.fronts.server.protogen --check   # exit 1 (and say which file) if they are stale

Needs grpcio-tools (the ``dev`` extra). The generated code carries the protobuf and grpcio versions it was made
with and refuses older runtimes; those stamps are left out of the comparison, so a check made with another
grpcio-tools release still tells whether the code matches the .proto.
"""

from __future__ import annotations

import difflib
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "chain.proto"
GENERATED = ("chain_pb2.py", "chain_pb2_grpc.py")
# The repository root, so generated imports read ``from workbench.fronts.server import chain_pb2``.
_ROOT = HERE.parents[2]
_PROTO_FROM_ROOT = PROTO.relative_to(_ROOT).as_posix()

# Lines that name the generator's versions, not the .proto's content.
_VERSION_STAMPS = re.compile(
    r"^(# Protobuf Python Version: .*"
    r"|GRPC_GENERATED_VERSION = .*"
    r"|    _runtime_version\.Domain\.PUBLIC,\n    \d+,\n    \d+,\n    \d+,)$",
    re.MULTILINE,
)


def generate(out_dir: Path) -> dict[str, str]:
    """Run protoc on chain.proto into ``out_dir``; each generated module's name and text."""
    from grpc_tools import protoc

    code = protoc.main(
        ["protoc", f"-I{_ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", _PROTO_FROM_ROOT]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {code}); its message is above")
    where = out_dir / Path(_PROTO_FROM_ROOT).parent
    return {name: (where / name).read_text() for name in GENERATED}


def stale(committed_dir: Path = HERE) -> list[str]:
    """The generated modules in ``committed_dir`` that differ from what chain.proto gives now (version stamps
    aside), each with the start of its diff."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    found = []
    for name, text in fresh.items():
        committed_path = committed_dir / name
        committed = committed_path.read_text() if committed_path.exists() else ""
        if _VERSION_STAMPS.sub("", committed) != _VERSION_STAMPS.sub("", text):
            diff = difflib.unified_diff(
                committed.splitlines(), text.splitlines(), f"{name} (committed)", f"{name} (from chain.proto)",
                lineterm="", n=1,
            )
            found.append(f"{name} is out of date with chain.proto:\n" + "\n".join(list(diff)[:40]))
    return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        problems = stale()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("regenerate: python -m workbench.fronts.server.protogen", file=sys.stderr)
        return 1 if problems else 0
    if args:
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in generate(Path(tmp)).items():
            (HERE / name).write_text(text)
            print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
