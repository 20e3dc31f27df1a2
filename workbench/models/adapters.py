"""LoRA adapters on one base model: named and versioned, checked before they serve, swapped live, freed once drained."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.errors import AdapterError
from workbench.models import heap

log = logging.getLogger(__name__)

# peft's name for "no adapter" in a mixed batch (``generate(adapter_names=[...])``).
BASE = "__base__"
# What a version of an adapter is doing: being checked, serving new requests, finishing the requests it
# already had, gone (freed), or turned away (its error says why).
STATES = ("staging", "live", "draining", "retiring", "retired", "refused")
_PICKLE = ("*.bin", "*.pt", "*.pth", "*.pkl")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"
# The advice for an adapter that passed the checks here and that peft then would not attach.
_PEFT_REFUSED = ("peft could not attach it to this base model: compare its adapter_config.json "
                 "(base_model_name_or_path, target_modules) with the model, and load it on the model it was trained on")
GOLDEN_PROMPTS = ("Hello", "Question: What is the capital of France?\nAnswer:", "A chain is a graph of hops.")


@dataclass(frozen=True)
class AdapterRules:
    """What an adapter must be to serve: a rank of at most ``max_rank``, LoRA on ``target_modules`` only
    (None: any module of the base model), and finite logits on ``golden_prompts``."""

    max_rank: int = 64
    target_modules: frozenset[str] | None = None
    golden_prompts: tuple[str, ...] = GOLDEN_PROMPTS


@dataclass
class AdapterVersion:
    """One version of a named adapter, as ``bench.adapters()`` shows it (or of a watched model: ``model_versions()``)."""

    name: str
    version: int
    path: str
    digest: str  # of adapter_config.json and the weights files: a new digest is a new version
    state: str = "staging"
    loaded_at: float | None = None  # when it went live (seconds since the epoch)
    swap_ms: float | None = None  # from noticing it to serving it: load, checks, switch
    retire_ms: float | None = None  # from the switch until the version it replaced was drained and freed
    error: str | None = None
    hint: str | None = field(default=None, repr=False)  # what to do about ``error``, for the caller a refusal reaches
    rank: int | None = None
    in_flight: int = 0
    memory_bytes: int = 0  # its weights in the peft model while attached (staging to retiring)
    switched_at: float | None = field(default=None, repr=False)  # perf_counter when a newer version replaced it

    @property
    def key(self) -> str:
        """The name it has inside the peft model, and on requests: ``sql@v2``."""
        return f"{self.name}@v{self.version}"


@dataclass(frozen=True)
class AdapterLease:
    """A request's hold on the version it runs with: that version stays loaded until every lease is released."""

    name: str
    version: int
    key: str


# Digests already computed, by directory and config name: the files' stats then, and the digest. A watch polls every
# couple of seconds, and keep-warm asks whether a watched model's folder still holds what it serves: 1 GB of weights
# took 0.93 s to hash here from the page cache, so a 7B model's 15 GB would keep a core busy for every 2 s poll.
_DIGESTS: dict[tuple[str, str], tuple[tuple[object, ...], str]] = {}
_DIGESTS_KEPT = 256
_digests_lock = threading.Lock()
# A file changed this recently may change again within its clock's tick (a coarse file system's mtime keeps its
# stats the same): its digest is not kept (git's racy-clean rule).
_RACY_S = 2.0


def content_digest(path: str | os.PathLike[str], config: str = _CONFIG) -> str:
    """A hash of what makes an adapter (or model) directory one version: its ``config`` and every weights file.

    Read again only where a file's stats (size, times, inode) changed since the last time it was hashed."""
    root = Path(path)
    files = [root / config] + sorted(p for pattern in ("*.safetensors", *_PICKLE) for p in root.glob(pattern))
    stats = tuple(_stat(file) for file in files)
    key = (os.path.abspath(root), config)
    with _digests_lock:
        known = _DIGESTS.get(key)
    if known is not None and known[0] == stats:
        return known[1]
    digest = _hashed(files)
    newest = max((max(s[3], s[4]) for s in stats if s is not None), default=0)
    if newest < (time.time() - _RACY_S) * 1e9:
        with _digests_lock:
            _DIGESTS.pop(key, None)
            if len(_DIGESTS) >= _DIGESTS_KEPT:
                del _DIGESTS[next(iter(_DIGESTS))]
            _DIGESTS[key] = (stats, digest)
    return digest


def _stat(file: Path) -> tuple[str, int, int, int, int, int] | None:
    try:
        info = file.stat()
    except OSError:
        return None
    return (file.name, info.st_size, info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_dev)


def _hashed(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        try:
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            digest.update(b"<missing>")
    return digest.hexdigest()[:16]


def relative_note(path: Path) -> str:
    """For an error about a path that is not there: where a relative one was looked for."""
    return "" if path.is_absolute() else f" (relative paths start at {os.getcwd()})"


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The tensors a safetensors file declares, checked against its size; AdapterError if it is damaged."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= size - 8:
                raise ValueError(f"its header length ({length}) does not fit a file of {size} bytes")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(t["data_offsets"][1]) for t in tensors.values()), default=0)
        if 8 + length + end != size:
            raise ValueError(f"it declares {end} bytes of tensors but holds {size - 8 - length}")
        return tensors
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise AdapterError(f"{path} is not a readable safetensors file: {exc}",
                           hint="an interrupted copy? write the adapter again (save_pretrained)") from None


def inspect_adapter(path: str | os.PathLike[str], base: Any, rules: AdapterRules) -> int:
    """Check an adapter directory against ``base`` (a transformers model) and ``rules`` without loading it.

    Returns its rank (the largest, where its rank_pattern gives some modules another). AdapterError says what is
    wrong: no config, pickled weights, damaged safetensors, a rank or target module the rules do not allow, or
    weights shaped for another base model.
    """
    root = Path(path)
    where = f"adapter {str(path)!r}"
    if not root.is_dir():
        raise AdapterError(f"{where} does not exist{relative_note(root)}" if not root.exists() else
                           f"{where} is not a directory", hint="give the folder that save_pretrained wrote")
    if not (root / _CONFIG).is_file():
        raise AdapterError(f"{where} is not a PEFT adapter directory: no {_CONFIG}",
                           hint="point at the folder that save_pretrained wrote")
    if not (root / ADAPTER_WEIGHTS).is_file():
        pickled = sorted(p.name for pattern in _PICKLE for p in root.glob(pattern))
        if pickled:
            raise AdapterError(f"{where} has only pickled weights ({', '.join(pickled)}), which can run code when "
                               "loaded: adapters load from safetensors only",
                               hint="save it again with save_pretrained(..., safe_serialization=True)")
        raise AdapterError(f"{where} has no {ADAPTER_WEIGHTS}", hint="is the copy complete?")
    try:
        config = json.loads((root / _CONFIG).read_text())
        rank = int(config["r"])
        # peft's rank_pattern gives the modules it matches a rank of their own (the weights are shaped by it).
        pattern = {str(key): int(value) for key, value in (config.get("rank_pattern") or {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AdapterError(f"{where}: {_CONFIG} is not a LoRA config ({type(exc).__name__}: {exc})",
                           hint="write the adapter again with peft's save_pretrained") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where} is a {config.get('peft_type')} adapter; only LoRA adapters are served")
    for where_rank, value in (("", rank), *((f" ({key!r} of its rank_pattern)", v) for key, v in pattern.items())):
        if not 1 <= value <= rules.max_rank:
            raise AdapterError(f"{where} has rank {value}{where_rank}; the rules allow 1 to {rules.max_rank}",
                               hint="raise max_rank if the memory and latency of a larger rank are fine")
    from peft.utils.other import get_pattern_key  # the match peft makes when it loads the adapter

    tensors = _safetensors_header(root / ADAPTER_WEIGHTS)
    modules = dict(base.named_modules())
    found = False
    for key, tensor in tensors.items():
        module_path, part = _module_of(key)
        leaf = module_path.rsplit(".", 1)[-1]
        # Every tensor counts, not only lora_A/lora_B: an embedding's LoRA, or a whole layer (modules_to_save).
        if rules.target_modules is not None and leaf not in rules.target_modules:
            raise AdapterError(f"{where} adapts {leaf!r} ({module_path}); the rules allow "
                               f"{', '.join(sorted(rules.target_modules))} only",
                               hint="retrain it on the allowed modules, or widen target_modules")
        if part not in ("lora_A", "lora_B"):
            continue
        found = True
        module = modules.get(module_path)
        if module is None:
            raise AdapterError(f"{where} has weights for {module_path!r}, which the base model lacks: it was built "
                               "for another base model", hint="load it on the model it was trained on")
        features = _features(module)
        if features is None:
            raise AdapterError(f"{where} adapts {module_path!r}, a {type(module).__name__}: adapters serve as LoRA on "
                               "linear layers only", hint="retrain it on the model's linear (projection) layers")
        shape = tuple(tensor.get("shape", ()))
        own = pattern.get(get_pattern_key(pattern, module_path), rank)
        expected = (own, features[0]) if part == "lora_A" else (features[1], own)
        if len(shape) != 2 or shape != expected:
            raise AdapterError(
                f"{where}: {module_path}.{part} is {list(shape)}, but this base model needs {list(expected)}: "
                "it was built for another base model (another hidden size)",
                hint="load it on the model it was trained on")
    if not found:
        raise AdapterError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return max([rank, *pattern.values()])


# Parts of a tensor's name in an adapter file that are peft's, not the base model's module names.
_PEFT_PARTS = ("base_layer", "modules_to_save", "token_adapter")


def _module_of(key: str) -> tuple[str, str | None]:
    """The base model's module a tensor of an adapter file belongs to, and its peft part (``lora_A``; None for a
    whole weight of the module, as modules_to_save keeps)."""
    parts = key.removeprefix("base_model.model.").split(".")
    for index, part in enumerate(parts):
        if part.startswith("lora_") or part in _PEFT_PARTS:
            return ".".join(parts[:index]), part
    return ".".join(parts[:-1]), None


def _features(module: Any) -> tuple[int, int] | None:
    """A layer's (in, out) features as LoRA sees them; None for a layer that is not linear."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):  # GPT-2's projections: a linear layer whose weight is stored (in, out)
        return tuple(module.weight.shape)  # type: ignore[return-value]
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
        return module.in_features, module.out_features
    return None


@dataclass
class _Named:
    """Every version of one named adapter, and the one serving now."""

    name: str
    path: str
    rules: AdapterRules
    versions: list[AdapterVersion] = field(default_factory=list)
    live: AdapterVersion | None = None


class AdapterSet:
    """The named LoRA adapters of one base model, each with its versions: the peft model and its lock.

    ``lock`` is held around every ``generate`` and every change to the adapters (load, delete): peft
    swaps hooks and dictionaries of the shared model in place, so the two must not overlap.
    """

    def __init__(self, base: Any, tokenizer: Any, device: torch.device) -> None:
        self.model: Any = base  # a PeftModel once the first adapter is attached
        self.base = base  # the transformers model underneath
        self.tokenizer = tokenizer
        self.device = device
        self.lock = threading.RLock()
        self._state = threading.Condition()
        self._named: dict[str, _Named] = {}
        # memory_bytes() when the registry measured its model at load: what its figure already holds.
        self.counted_bytes = 0

    # -- queries -------------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """The weights of every version attached now: the live ones, and those staging or still draining."""
        with self._state:
            return sum(v.memory_bytes for named in self._named.values() for v in named.versions
                       if v.state not in ("retired", "refused"))

    def names(self) -> list[str]:
        with self._state:
            return sorted(self._named)

    def live(self, name: str) -> AdapterVersion | None:
        with self._state:
            named = self._named.get(name)
            return named.live if named else None

    def versions(self) -> list[AdapterVersion]:
        """Every version of every adapter, by name then version."""
        with self._state:
            return [v for n in sorted(self._named) for v in self._named[n].versions]

    def path(self, name: str) -> str:
        with self._state:
            return self._named[name].path

    def set_rules(self, name: str, rules: AdapterRules) -> None:
        """The rules later versions of ``name`` are checked against."""
        with self._state:
            self._named[name].rules = rules

    # -- leases --------------------------------------------------------------------------------

    def acquire(self, name: str, where: str = "") -> AdapterLease:
        """Pin the live version of ``name`` for one request; AdapterError (with near names) for an unknown one."""
        with self._state:
            named = self._named.get(name)
            if named is None or named.live is None:
                known = sorted(n for n, v in self._named.items() if v.live is not None)
                close = difflib.get_close_matches(name, known, n=1)
                hint = (f"did you mean {close[0]!r}? " if close else "") + (
                    f"adapters: {', '.join(known)}" if known else "load some: bench.load(NAME, PATH, adapters={...})")
                raise AdapterError(f"{where}no live adapter named {name!r}", hint=hint)
            version = named.live
            version.in_flight += 1
            return AdapterLease(name, version.version, version.key)

    def release(self, lease: AdapterLease) -> None:
        """Let go of a request's version; the last request of a draining version frees it."""
        with self._state:
            version = self._find(lease.name, lease.version)
            version.in_flight -= 1
            drained = version.state == "draining" and version.in_flight == 0
            self._state.notify_all()
        if drained:
            self._retire(version)

    def _find(self, name: str, number: int) -> AdapterVersion:
        return next(v for v in self._named[name].versions if v.version == number)

    # -- changes -------------------------------------------------------------------------------

    def add(self, name: str, path: str | os.PathLike[str], rules: AdapterRules | None = None) -> AdapterVersion:
        """Load ``path`` as adapter ``name`` (version 1), checked as any version is; AdapterError if refused."""
        check_name(name, "adapter name ", f"name it as a hop would: adapter: {_suggest(name)}")
        with self._state:
            if name in self._named:
                raise AdapterError(f"an adapter named {name!r} is already loaded", hint="pick another name")
            # Absolute from here on: a watcher and a later stage read it after the notebook may have changed directory.
            self._named[name] = _Named(name, os.path.abspath(path), rules or AdapterRules())
        version = self.stage(name, path, raising=True)
        if version.state == "refused":
            with self._state:
                del self._named[name]
            raise AdapterError(f"adapter {name!r}: {version.error}", hint=version.hint)
        return version

    def stage(self, name: str, path: str | os.PathLike[str] | None = None,
              digest: str | None = None, noticed: float | None = None, *, raising: bool = False) -> AdapterVersion:
        """Bring a new version of ``name`` live in stages: load it under a versioned name, check it, switch.

        Requests already holding the old version finish on it; then it is deleted and its memory
        freed. A version that fails a check is refused (its row says why) and the live one serves on.
        A refusal is logged at WARNING (a watcher's swap has no caller to tell), or at INFO when ``raising``:
        the caller raises it, and a warning too would say it twice (a notebook printed both).
        """
        started = noticed if noticed is not None else time.perf_counter()
        with self._state:
            named = self._named[name]
            path = str(path) if path is not None else named.path
            number = max((v.version for v in named.versions), default=0) + 1
            version = AdapterVersion(name, number, path, digest or content_digest(path))
            named.versions.append(version)
        try:
            version.rank = inspect_adapter(path, self.base, named.rules)
            try:
                self._attach(version)
                self._check_logits(version, named.rules)
            except BaseException:
                self._detach(version.key)  # whatever of it peft attached before it failed
                raise
        except Exception as exc:
            with self._state:
                version.state = "refused"
                if isinstance(exc, AdapterError):
                    version.error, version.hint = exc.message, exc.hint
                else:  # peft's own refusal, past the checks above
                    version.error, version.hint = f"{type(exc).__name__}: {exc}", _PEFT_REFUSED
            log.log(logging.INFO if raising else logging.WARNING, "adapter %s v%d from %s refused: %s", name, number,
                    path, version.error)
            return version
        with self._state:  # the switch: from here on new requests get this version
            previous = named.live
            if previous is not None and previous.version > version.version:
                # Two swaps at once (a watcher replaced mid-swap, a stage by hand): a newer version, staged after this
                # one, went live while this one was checked. An older version never replaces a newer one.
                version.state, version.switched_at = "draining", time.perf_counter()
                version.error = f"v{previous.version}, staged after it, went live while it was checked"
                superseded = True
            else:
                superseded = False
        if superseded:
            self._retire(version)
            return version
        with self._state:
            previous = named.live
            named.live, version.state, version.loaded_at = version, "live", time.time()
            version.swap_ms = (time.perf_counter() - started) * 1e3
            drained = False
            if previous is not None:
                previous.state, previous.switched_at = "draining", time.perf_counter()
                drained = previous.in_flight == 0
        if previous is not None and drained:
            self._retire(previous)
        return version

    def _retire(self, version: AdapterVersion) -> None:
        """Delete a drained version from the peft model and free its memory."""
        with self._state:
            if version.state != "draining":
                return
            version.state = "retiring"
        self._detach(version.key)
        with self._state:
            version.state = "retired"
            if version.switched_at is not None:
                version.retire_ms = (time.perf_counter() - version.switched_at) * 1e3
            self._state.notify_all()

    def _attach(self, version: AdapterVersion) -> None:
        from peft import PeftModel

        with self.lock:
            if self.model is self.base:
                self.model = PeftModel.from_pretrained(self.base, version.path, adapter_name=version.key,
                                                       torch_device=str(self.device))
            else:
                self.model.load_adapter(version.path, adapter_name=version.key, torch_device=str(self.device))
            self.model.eval()
            # peft names an adapter's weights ``...lora_A.<key>.weight`` (an embedding's ``...lora_embedding_A.<key>``).
            inside, last = f".{version.key}.", f".{version.key}"
            version.memory_bytes = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                                       if inside in n or n.endswith(last))

    def _detach(self, key: str) -> None:
        with self.lock:
            if self.model is self.base or key not in self.model.peft_config:
                return
            others = [k for k in self.model.peft_config if k != key]
            if key in self.model.active_adapters and others:
                self.model.set_adapter(others[0])  # so peft need not pick one (and warn) on delete
            if others:
                self.model.delete_adapter(key)
        heap.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_logits(self, version: AdapterVersion, rules: AdapterRules) -> None:
        prompts = list(rules.golden_prompts)
        if not prompts:
            return
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        with self.lock, torch.inference_mode():
            logits = self.model(input_ids=encoded["input_ids"].to(self.device),
                                attention_mask=encoded["attention_mask"].to(self.device),
                                adapter_names=[version.key] * len(prompts)).logits
        if not bool(torch.isfinite(logits).all()):
            raise AdapterError(f"adapter {version.name!r} v{version.version} gives non-finite logits (NaN or inf) on "
                               "the golden prompts", hint="its weights are damaged or diverged in training")

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until no version is draining (every replaced version freed); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            while any(v.state in ("draining", "retiring") for v in self.versions()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._state.wait(remaining)
            return True

    def rows(self, model: str) -> list[dict[str, Any]]:
        return [
            {"model": model, "name": v.name, "version": v.version, "key": v.key, "state": v.state,
             "loaded_at": v.loaded_at, "swap_ms": None if v.swap_ms is None else round(v.swap_ms, 2),
             "retire_ms": None if v.retire_ms is None else round(v.retire_ms, 2),
             "in_flight": v.in_flight, "rank": v.rank, "digest": v.digest, "path": v.path, "error": v.error}
            for v in self.versions()
        ]


# What a watcher's ``stage`` returns for a version it cannot bring in now (its model is evicted, and would load back
# from elsewhere): the watcher looks at it again at its next poll, rather than counting it seen.
LATER = object()


class DirectoryWatcher:
    """Polls a directory every ``interval_s`` and stages each new version of it (a daemon thread).

    A version is the directory's content digest (``config`` and the weights); one that changes again
    within ``settle_s`` is still being written, and waits for the next poll. ``stage(digest, noticed)``
    brings a version in (``noticed``: perf_counter when the change was seen), or returns :data:`LATER` to be
    asked again at the next poll; :meth:`stop` ends the watch.
    """

    def __init__(self, path: str | os.PathLike[str], interval_s: float, stage: Callable[[str, float], object], *,
                 seen: str | None = None, config: str = _CONFIG, label: str = "directory",
                 settle_s: float = 0.2) -> None:
        if isinstance(interval_s, bool) or not (isinstance(interval_s, (int, float)) and math.isfinite(interval_s)
                                                 and interval_s > 0):
            raise AdapterError(f"interval_s must be a number of seconds > 0, got {interval_s!r}")
        self.path, self.config, self.label = str(path), config, label
        self.interval_s, self.settle_s = float(interval_s), min(settle_s, interval_s / 2)
        self._stage = stage
        self._stop = threading.Event()
        self._seen = seen if seen is not None else content_digest(self.path, config)
        self._thread = threading.Thread(target=self._loop, name=f"workbench-watch-{label}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # a watcher must outlive one bad poll
                log.exception("watching %s at %s failed", self.label, self.path)

    def poll(self) -> object:
        """Stage the directory's content if it changed since the last version seen; what ``stage`` returned, or None."""
        digest = content_digest(self.path, self.config)
        if digest == self._seen:
            return None
        noticed = time.perf_counter()
        if self._stop.wait(self.settle_s) or content_digest(self.path, self.config) != digest:
            return None  # still being written (or stopping): look again at the next poll
        seen, self._seen = self._seen, digest
        staged = self._stage(digest, noticed)
        if staged is LATER:
            self._seen = seen
        return staged

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def check_name(name: object, where: str = "", hint: str = "adapters={'sql': '/adapters/sql'}") -> None:
    """Refuse a name no hop could pick: not an identifier (peft's module names take no '.', a spec no space), or
    ``__base__``, which stands for the base model in a mixed batch."""
    if not isinstance(name, str) or not name.isidentifier() or name == BASE:
        why = "stands for the base model" if name == BASE else "is not a name a hop can use (letters, digits, _)"
        raise AdapterError(f"{where}{name!r} {why}", hint=hint)


def _suggest(name: object) -> str:
    """A name like ``name`` that :func:`check_name` takes: ``my.sql`` becomes ``my_sql``."""
    text = "".join(c if c.isalnum() or c == "_" else "_" for c in str(name)).strip("_") or "adapter"
    return f"a_{text}" if text[0].isdigit() else text


def parse_adapters(adapters: Any) -> tuple[tuple[str, str], ...]:
    """Named adapters as LoadSettings keeps them: from a dict, pairs, or ``"sql=/a,chat=/b"`` (a front end's flag)."""
    if adapters is None or adapters == ():
        return ()
    if isinstance(adapters, str):
        pairs: Iterable[Any] = [part.split("=", 1) for part in adapters.split(",") if part.strip()]
    elif isinstance(adapters, dict):
        pairs = adapters.items()
    else:
        pairs = adapters
    parsed = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise AdapterError(f"adapters: {pair!r} is not NAME=PATH", hint="adapters={'sql': '/adapters/sql'}")
        name, path = str(pair[0]).strip(), os.fspath(pair[1])
        check_name(name, "adapters: ", "adapters={'sql': '/adapters/sql'}")
        parsed.append((name, str(path)))
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapters: a name appears twice in {names}")
    return tuple(parsed)
