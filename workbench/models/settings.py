"""How to load a model: LoadSettings, whose fields every front end offers as its load options."""

from __future__ import annotations

from dataclasses import Field, dataclass, field
from typing import Any

from workbench.errors import ModelLoadError


def is_server_url(text: str) -> bool:
    """Whether ``text`` names a model server (an http or https URL) rather than weights or a device."""
    return text.strip().lower().startswith(("http://", "https://"))


def _option(default: Any, help: str, metavar: str | None = None, *, repr: bool = True) -> Any:
    # The metadata is each option's help: the magics and the command line build their flags from it,
    # so a new load setting is written here once and shows up in every front end.
    return field(default=default, repr=repr, metadata={"help": help, "metavar": metavar})


# The number settings' annotations as written (postponed annotations: strings), with whether None (off) is allowed.
_NUMBERS: dict[str, tuple[type, bool]] = {"int": (int, False), "float": (float, False), "float | None": (float, True)}


def number_setting(option: Field[Any]) -> tuple[type, bool] | None:
    """A number setting's kind (int or float) and whether it may be None (off, as ``hang_timeout_s``); None for a
    setting that is not a number. The command line's flags and the configuration files both read this."""
    return _NUMBERS.get(str(option.type))


# The longest name one part of a path may have on the file systems in use (a hub id's parts are far shorter).
NAME_MAX = 255


def _check_path_parts(what: str, text: str) -> None:
    """Refuse a path no file system holds: asking whether it exists raised OSError (File name too long)."""
    for part in text.replace("\\", "/").split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise ModelLoadError(
                f"{what} {text[:80]!r}{'...' if len(text) > 80 else ''} is neither a local directory nor a hub id: "
                f"one part of it is {len(part):,} characters, and a file or folder name holds at most {NAME_MAX} bytes",
                hint="give the directory that holds the model, or a hub id like 'org/name'")


# The settings only a model on a server reads (see LoadSettings).
SERVER_SETTINGS = ("served_model", "api_key", "read_timeout_s")


@dataclass(frozen=True)
class LoadSettings:
    """How to load a model: where from, onto what, and which risks the user opted into.

    A ``source`` that is an http(s) URL is an OpenAI-compatible server (``http://127.0.0.1:8000/v1``):
    ``served_model`` names the model on it, ``api_key`` goes in its Authorization header.
    ``engine="ray"`` serves each replica from a Ray actor, placed with ``num_gpus`` and ``num_cpus``
    on the cluster at ``address`` (default: a local Ray).
    """

    source: str
    device: str = _option("auto", "auto (default), cpu, cuda, cuda:1, mps", "D")
    dtype: str = _option("auto", "auto (default), float32, bfloat16, float16", "T")
    adapter: str | None = _option(None, "a PEFT (LoRA) adapter directory", "PATH")
    # Named LoRA adapters on the one base model, as (name, directory) pairs; a hop picks one with ``adapter: NAME``.
    adapters: tuple[tuple[str, str], ...] = _option(
        (), "named LoRA adapters a hop picks with adapter: NAME (NAME=PATH,NAME=PATH)", "NAME=PATH,...")
    trust_remote_code: bool = _option(False, "run Python code shipped with the model")
    allow_pickle: bool = _option(False, "accept pickled (.bin, .pt) weights, which can run code")
    revision: str | None = _option(None, "a branch, tag or commit of a hub model", "REV")
    warmup: bool = _option(False, "run a tiny generate after loading; it counts as cold start")
    isolation: str = _option("thread", "thread (default: in this process) or process (a child process of its own)", "I")
    restarts: int = _option(
        3, "process isolation or engine ray: how often a model process or Ray actor that died is started again "
        "(default 3)", "N")
    hang_timeout_s: float | None = _option(
        None, "process isolation: kill (and restart) a model process that ends no decoding step of a batch for S "
        "seconds, as hung (default: never; a long prompt's prefill is one step)", "S")
    served_model: str | None = _option(
        None, "for a server URL: the model's name on the server (default: the one model it lists)", "M")
    # Kept out of repr, so a settings object shown in a notebook or a log does not print the key.
    api_key: str | None = _option(None, "for a server URL: sent as 'Authorization: Bearer KEY'", "KEY", repr=False)
    read_timeout_s: float = _option(
        60.0, "for a server URL: how long a stream may go without a byte, the first included (default 60)", "S")

    engine: str = _option("local", "local (default: this process) or ray (each replica a Ray actor)", "E")
    address: str | None = _option(None, "engine ray: an existing cluster (ray://head:10001, auto); default a local one",
                                  "ADDR")
    # Floats, so their flags take fractions (--num-gpus 0.5: two replicas share a GPU).
    num_gpus: float = _option(0.0, "engine ray: GPUs each replica's actor asks of the cluster (default 0)", "N")
    num_cpus: float = _option(1.0, "engine ray: CPUs each replica's actor asks of the cluster (default 1)", "N")

    def __post_init__(self) -> None:
        if isinstance(self.source, str) and not self.source.strip():  # else the working directory, as Path('') is
            raise ModelLoadError("the model's source is empty", hint="give the directory that holds the model (its "
                                 "config.json and weights), a hub id like 'org/name', or a server's URL")
        # A front end's adapters text is parsed (and so checked) by the load.
        named = [(f"adapter {pair[0]!r}", pair[1]) for pair in self.adapters if isinstance(pair, tuple) and len(pair) == 2]
        for what, text in [("source", self.source), ("adapter", self.adapter), *named]:
            if isinstance(text, str) and not is_server_url(text):
                _check_path_parts(what, text)

    @property
    def remote(self) -> bool:
        """Whether ``source`` is a model server (an http or https URL) rather than weights to load here."""
        return is_server_url(self.source)
