"""How to load a model: LoadSettings, whose fields every front end offers as its load options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _option(default: Any, help: str, metavar: str | None = None) -> Any:
    # The metadata is each option's help: the magics and the command line build their flags from it,
    # so a new load setting is written here once and shows up in every front end.
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class LoadSettings:
    """How to load a model: where from, onto what, and which risks the user opted into."""

    source: str
    device: str = _option("auto", "auto (default), cpu, cuda, cuda:1, mps", "D")
    dtype: str = _option("auto", "auto (default), float32, bfloat16, float16", "T")
    adapter: str | None = _option(None, "a PEFT (LoRA) adapter directory", "PATH")
    trust_remote_code: bool = _option(False, "run Python code shipped with the model")
    allow_pickle: bool = _option(False, "accept pickled (.bin, .pt) weights, which can run code")
    revision: str | None = _option(None, "a branch, tag or commit of a hub model", "REV")
    warmup: bool = _option(False, "run a tiny generate after loading; it counts as cold start")
    engine: str = _option("local", "local (default: this process) or ray (each replica a Ray actor)", "E")
    address: str | None = _option(None, "engine ray: an existing cluster (ray://head:10001, auto); default a local one",
                                  "ADDR")
    num_gpus: float = _option(0, "engine ray: GPUs each replica's actor asks of the cluster (default 0)", "N")
    num_cpus: float = _option(1, "engine ray: CPUs each replica's actor asks of the cluster (default 1)", "N")
