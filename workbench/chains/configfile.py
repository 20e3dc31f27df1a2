"""The workbench configuration file (models, their policies, chains, overrides), validated and applied live.

```yaml
models:
  tiny: {source: tiny, device: cpu, batching: {policy: dynamic, max_batch_size: 16, max_wait_ms: 5}}
chains:
  qa: qa.yaml                    # relative to this file
overrides:
  qa.answer.temperature: 0.7     # CHAIN.HOP.FIELD: value, as chain.set takes it
```

Each edit is validated whole (the file, every chain file it names, every override) before
anything changes; one that does not validate is refused and the last good configuration keeps
serving. What changed is applied the least disruptive way: a new batching or balance policy
live, a changed source or load setting by loading the model again.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from workbench.chains.live import (
    DEFAULT_INTERVAL_S,
    MAX_REFUSALS_KEPT,
    ConfigRefusal,
    ConfigVersion,
    FileWatcher,
    apply_overrides,
    digest_of,
    logger,
    read_text,
    refuse,
    settable_path,
)
from workbench.chains.spec import _NEWLINES, _check_expansion, _Lines, parse_spec
from workbench.engine.balancing import BalancePolicy, parse_balance
from workbench.engine.batching import (
    POLICY_FORMS,
    BatchingPolicy,
    ContinuousBatching,
    DynamicBatching,
    NoBatching,
    StaticBatching,
    default_policy,
    parse_policy,
)
from workbench.errors import ConfigError, ModelLoadError, SpecError, WorkbenchError, did_you_mean
from workbench.knowledge import GraphStore
from workbench.models.adapters import parse_adapters
from workbench.models.settings import LoadSettings, number_setting
from workbench.models.tiny import resolve_source

if TYPE_CHECKING:
    from workbench.chains.chain import Chain
    from workbench.models.registry import ModelRegistry

TOP_FIELDS = ("models", "chains", "overrides")
# Risks a model opts into (running its code, unpickling) and secrets stay in code: bench.load(...) takes them.
_NOT_IN_FILE = ("trust_remote_code", "allow_pickle", "api_key")
LOAD_FIELDS = tuple(f.name for f in dataclasses.fields(LoadSettings) if f.name not in _NOT_IN_FILE)
MODEL_FIELDS = (*LOAD_FIELDS, "batching", "replicas", "balance")
POLICIES: dict[str, type[BatchingPolicy]] = {
    "none": NoBatching, "static": StaticBatching, "dynamic": DynamicBatching, "continuous": ContinuousBatching,
}
# The names people write for a policy's settings, as the policies spell them.
_POLICY_ALIASES = {"max_batch_size": "max_batch", "batch_size": "size"}


class ConfigHost(Protocol):
    """What applying a configuration needs of the workbench (the Workbench implements it)."""

    def load(self, name: str, source: str | None = None, **settings: Any) -> Any: ...
    def unload(self, name: str, *, forget: bool = False) -> int: ...
    def set_batching(self, name: str, policy: BatchingPolicy) -> None: ...
    def set_balance(self, name: str, policy: str | BalancePolicy) -> None: ...
    def chain(self, spec: Any, name: str | None = None, *, watch: bool = False,
              interval_s: float = DEFAULT_INTERVAL_S, base_dir: str | Path | None = None) -> Chain: ...
    def allow_modules(self, *modules: str) -> tuple[str, ...]: ...
    @property
    def registry(self) -> ModelRegistry: ...
    @property
    def graphs(self) -> GraphStore: ...


@dataclass(frozen=True)
class ModelEntry:
    """One model of the file: how to load it, its batching and balance policies, its replicas."""

    settings: LoadSettings
    batching: BatchingPolicy | None = None
    balance: str | None = None
    replicas: int | tuple[str, ...] | None = None

    def load_key(self) -> tuple[Any, ...]:
        """What, when it changes, takes loading the model again (a policy alone changes live)."""
        return self.settings, self.replicas


@dataclass(frozen=True)
class WorkbenchConfig:
    """A validated configuration file: models by name, chain files by name, overrides by chain."""

    path: str
    models: dict[str, ModelEntry]
    chains: dict[str, Path]
    overrides: dict[str, dict[str, Any]]
    digest: str = ""


def parse_config(text: str, path: str) -> WorkbenchConfig:
    """Validate a configuration file's text (the structure; chain files are checked by :class:`LiveConfig`)."""
    lines = _Lines()
    data = _load(text, path, lines)

    def fail(message: str, *keys: Any, hint: str | None = None) -> ConfigError:
        return ConfigError(message, path=path, field=".".join(map(str, keys)) or None, line=lines.of(*keys),
                           hint=hint)

    if not isinstance(data, Mapping):
        raise fail(f"a workbench configuration is a mapping with {', '.join(TOP_FIELDS)}, not {type(data).__name__}")
    _known(data, TOP_FIELDS, (), fail)
    models: dict[str, ModelEntry] = {}
    for name, raw in _section(data, "models", fail).items():
        models[name] = _model(name, raw, fail)
    base = Path(path).parent
    chains: dict[str, Path] = {}
    for name, raw in _section(data, "chains", fail).items():
        if not isinstance(raw, str) or not raw.strip():
            raise fail(f"chain {name!r} is the path of its spec file, got {raw!r:.80}", "chains", name,
                       hint="e.g. chains: {qa: qa.yaml}; a relative path is read from the configuration's directory")
        if "\0" in raw:  # no file system takes it: Path.resolve raised ValueError (embedded null byte)
            raise fail(f"chain {name!r}: the path {raw!r:.80} holds a NUL character (\\0)", "chains", name,
                       hint="write the spec file's path as it is on disk")
        try:
            chains[name] = (base / raw).resolve() if not Path(raw).is_absolute() else Path(raw)
        except (OSError, RuntimeError) as exc:  # a symlink loop, say
            raise fail(f"chain {name!r}: cannot follow the path {raw!r:.80}: {exc}", "chains", name) from None
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in _section(data, "overrides", fail).items():
        chain, _, rest = str(key).partition(".")
        if not rest:
            raise fail(f"override {key!r} names no field: CHAIN.HOP.FIELD or CHAIN.FIELD", "overrides", key,
                       hint="e.g. qa.answer.temperature: 0.7")
        overrides.setdefault(chain, {})[rest] = value
    digest = digest_of({"models": {n: _plain(m) for n, m in models.items()},
                        "chains": {n: str(p) for n, p in chains.items()}, "overrides": overrides})
    return WorkbenchConfig(path, models, chains, overrides, digest)


def _load(text: str, path: str, lines: _Lines) -> Any:
    """YAML to data, with the line of every key recorded; the spec parser's guards against alias bombs and depth."""
    text = _NEWLINES.sub("\n", text)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            raise ConfigError("the file is empty", path=path, hint="start with  models:  and  chains:")
        _check_expansion(node)
        _check_nodes(node, text, path)
        lines.walk(node)
        return yaml.safe_load(text)
    except RecursionError:
        raise ConfigError("the YAML nests too deeply to read", path=path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"not valid YAML: {problem}", path=path, line=mark.line + 1 if mark is not None else None,
                          hint="check indentation and quoting") from None
    except ConfigError:
        raise
    except SpecError as exc:  # a repeated key, an alias bomb: the spec parser's words, this file's place
        raise ConfigError(exc.message.split(": ", 1)[-1], path=path, field=exc.field, line=exc.line,
                          hint=exc.hint) from None


def _check_nodes(root: yaml.Node, text: str, path: str) -> None:
    """Refuse what YAML reads but this file cannot hold: a key that is a list or a mapping (``? [a]``: no
    setting is named so, and recording its line raised TypeError), an integer longer than Python reads."""
    digits = sys.get_int_max_str_digits() or None  # 0: no limit
    walked: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())]
    while stack:
        node, keys = stack.pop()
        if id(node) in walked:  # an alias of a node already walked
            continue
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    written = " ".join(text[key.start_mark.index:key.end_mark.index].split())
                    kind = "list" if isinstance(key, yaml.SequenceNode) else "mapping"
                    raise ConfigError(f"a key is a {kind} ({written:.40}); keys here are names",
                                      path=path, field=".".join([*keys, f"{written:.40}"]),
                                      line=key.start_mark.line + 1, hint="write NAME: VALUE (no '? ' before a key)")
                stack.append((value, (*keys, key.value)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*keys, str(index))) for index, item in enumerate(node.value))
        elif digits is not None and node.tag == "tag:yaml.org,2002:int" and \
                sum(c.isdigit() for c in node.value) > digits:
            raise ConfigError(f"a number of {len(node.value):,} digits is more than Python reads ({digits:,})",
                              path=path, field=".".join(keys) or None, line=node.start_mark.line + 1)


def _known(data: Mapping[str, Any], allowed: Collection[str], keys: tuple[Any, ...], fail: Any) -> None:
    for key in data:
        if key not in allowed:
            hint = f"fields here: {', '.join(allowed)}"
            if key in _NOT_IN_FILE:
                hint = f"{key} is a risk or a secret a file does not opt into: pass it to bench.load in code"
            raise fail(f"unknown field {key!r}{did_you_mean(str(key), allowed)}", *keys, key, hint=hint)


def _section(data: Mapping[str, Any], key: str, fail: Any) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise fail(f"{key!r} must be a mapping from names to settings, got {value!r:.80}", key)
    return dict(value)


def _model(name: str, raw: Any, fail: Any) -> ModelEntry:
    if isinstance(raw, str):
        raw = {"source": raw}
    if not isinstance(raw, Mapping):
        raise fail(f"model {name!r} is a source, or a mapping with source and settings, got {raw!r:.80}",
                   "models", name, hint="e.g. tiny: {source: tiny, device: cpu}")
    _known(raw, MODEL_FIELDS, ("models", name), fail)
    if not isinstance(raw.get("source"), str) or not raw["source"].strip():
        raise fail(f"model {name!r} needs a source: a directory, a hub id, a server URL, or 'tiny'",
                   "models", name, "source")
    values: dict[str, Any] = {}
    defaults = {f.name: f.default for f in dataclasses.fields(LoadSettings)}
    # Seconds that are off by default (hang_timeout_s: None): a number when given.
    optional = {f.name for f in dataclasses.fields(LoadSettings) if (number_setting(f) or (float, False))[1]}
    for key in LOAD_FIELDS:
        if key not in raw or key == "source":
            continue
        if key == "adapters":
            values[key] = _adapters(raw[key], fail, ("models", name, key))
            continue
        value, default = raw[key], 0.0 if key in optional and raw[key] is not None else defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and \
                (isinstance(value, int) or isinstance(default, float)) and not _past_float(value)
        else:
            ok = isinstance(value, str) or (value is None and default is None)
        if not ok:
            what = "true or false" if isinstance(default, bool) else "a number >= 0" if isinstance(default, float) \
                else "a whole number >= 0" if isinstance(default, int) else "text"
            if _past_float(value):
                what += f" and at most {sys.float_info.max:.3g}"
            raise fail(f"{key} must be {what}, got {value!r:.80}", "models", name, key)
        values[key] = float(value) if isinstance(default, float) else value
    settings = LoadSettings(source=raw["source"].strip(), **values)
    from workbench.models.registry import check_settings  # torch's import, as the workbench that reads this has

    try:
        check_settings(settings)  # as the file is read: an edit it refuses unloads nothing
    except ModelLoadError as exc:
        field = next((key for key in raw if isinstance(key, str) and exc.message.startswith(f"{key} ")), None)
        raise fail(exc.message, "models", name, *([field] if field else []), hint=exc.hint) from None
    batching = _batching(raw["batching"], fail, ("models", name, "batching")) if "batching" in raw else None
    balance = None
    if "balance" in raw:
        try:
            balance = parse_balance(raw["balance"]).name
        except WorkbenchError as exc:
            raise fail(exc.message, "models", name, "balance", hint=exc.hint) from None
    replicas = raw.get("replicas")
    if replicas is not None:
        if isinstance(replicas, list) and replicas and all(isinstance(r, str) and r for r in replicas):
            replicas = tuple(replicas)
        elif isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise fail(f"replicas must be a whole number >= 1 or a list of devices or URLs, got {replicas!r:.80}",
                       "models", name, "replicas", hint="e.g. replicas: 2, or replicas: [cpu, cpu]")
    return ModelEntry(settings, batching, balance, replicas)


def _past_float(value: Any) -> bool:
    """Whether ``value`` is an integer no float holds (YAML reads any number of digits; seconds are floats)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max


def _adapters(value: Any, fail: Any, keys: tuple[Any, ...]) -> tuple[tuple[str, str], ...]:
    """A model's named LoRA adapters, ``{NAME: PATH}`` (or ``NAME=PATH,...`` as a flag takes them), as pairs."""
    if not isinstance(value, (str, Mapping)) or \
            (isinstance(value, Mapping) and not all(isinstance(path, str) and path for path in value.values())):
        raise fail(f"adapters is a mapping from names to adapter directories, got {value!r:.80}", *keys,
                   hint="e.g. adapters: {sql: /adapters/sql}")
    try:
        return parse_adapters(dict(value) if isinstance(value, Mapping) else value)
    except WorkbenchError as exc:
        raise fail(exc.message, *keys, hint="e.g. adapters: {sql: /adapters/sql}") from None


def _batching(value: Any, fail: Any, keys: tuple[Any, ...]) -> BatchingPolicy:
    """A batching policy from its short form (``dynamic:16:5ms``) or a mapping (``{policy: dynamic, ...}``)."""
    try:
        if isinstance(value, str):
            return parse_policy(value)
        if not isinstance(value, Mapping) or not isinstance(value.get("policy"), str):
            raise fail(f"batching is a policy's short form or a mapping with 'policy', got {value!r:.80}", *keys,
                       hint=f"e.g. batching: dynamic:16:5ms, or {{policy: dynamic, max_batch_size: 16, max_wait_ms: 5}}"
                       f"; the forms are {POLICY_FORMS}")
        kind = value["policy"].strip().lower()
        if kind not in POLICIES:
            raise fail(f"unknown batching policy {kind!r}", *keys, "policy", hint=f"policies: {', '.join(POLICIES)}")
        cls = POLICIES[kind]
        settings = {_POLICY_ALIASES.get(k, k): v for k, v in value.items() if k != "policy"}
        names = [f.name for f in dataclasses.fields(cls)]
        for key, item in settings.items():
            if key not in names:
                original = next(k for k in value if _POLICY_ALIASES.get(k, k) == key)
                raise fail(f"{kind} batching has no setting {original!r}", *keys, original,
                           hint=f"its settings: {', '.join(names) or 'none'}")
            if isinstance(item, bool) or not isinstance(item, (int, float)) or _past_float(item):
                original = next(k for k in value if _POLICY_ALIASES.get(k, k) == key)
                most = f" (at most {sys.float_info.max:.3g})" if _past_float(item) else ""
                raise fail(f"{original} must be a number{most}, got {item!r:.80}", *keys, original)
        return cls(**settings)
    except ConfigError:
        raise
    except WorkbenchError as exc:
        raise fail(exc.message, *keys, hint=exc.hint) from None


def _plain(entry: ModelEntry) -> dict[str, Any]:
    return {"settings": dataclasses.asdict(entry.settings), "batching": getattr(entry.batching, "name", None),
            "balance": entry.balance, "replicas": entry.replicas}


# -- applying it, live --------------------------------------------------------------------------------------


@dataclass
class _Applied:
    """What a configuration put in place, so the next one knows what to change and what to leave."""

    config: WorkbenchConfig | None = None
    chains: dict[str, Chain] = field(default_factory=dict)


class LiveConfig:
    """A workbench configuration file in force: its version, refused edits, and (if watched) its watcher.

    Built by ``bench.configure(path, watch=True)``; an edit of the file is applied within about
    ``interval_s`` if it validates, and refused (logged, warned about, kept in ``errors``) if not.
    """

    def __init__(self, host: ConfigHost, path: str | Path, watch: bool, interval_s: float) -> None:
        self.path = Path(path).expanduser().absolute()  # a later %cd must not move it (read again on every edit)
        self._host = host
        self._watch = watch
        self._interval_s = interval_s
        self._lock = threading.RLock()
        self._applied = _Applied()
        self._counter = 0
        self.version: ConfigVersion | None = None
        self.refusals: deque[ConfigRefusal] = deque(maxlen=MAX_REFUSALS_KEPT)
        self._watcher: FileWatcher | None = None

    @property
    def errors(self) -> list[ConfigRefusal]:
        """Edits that were refused, oldest first; the configuration of :attr:`version` kept serving."""
        return list(self.refusals)

    @property
    def config(self) -> WorkbenchConfig | None:
        """The configuration in force (None before the first one applied)."""
        return self._applied.config

    @property
    def chains(self) -> dict[str, Chain]:
        """The chains the configuration names, by name."""
        return dict(self._applied.chains)

    def start(self) -> LiveConfig:
        """Apply the file now (raising what refuses it), then watch it if asked."""
        self.apply(read_text(self.path, "workbench configuration"))
        if self._watch:
            self._watcher = FileWatcher(self.path, lambda text: self.apply(text, refused=True), self._interval_s,
                                        on_unreadable=self._unreadable, what="workbench configuration").start()
        return self

    def stop(self) -> None:
        """Stop watching the file and the chain files it named; what is loaded stays."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        for chain in self._applied.chains.values():
            chain.unwatch()

    @property
    def watching(self) -> bool:
        return self._watcher is not None and self._watcher.running

    def _unreadable(self, error: WorkbenchError) -> None:
        self.refusals.append(refuse(str(self.path), error, self.version, "the workbench configuration"))

    def apply(self, text: str, refused: bool = False) -> ConfigVersion:
        """Validate ``text`` whole, then change what differs from the configuration in force.

        ``refused=True`` (the watcher) also records and warns about a refusal before raising it. Anything that
        fails while an edit is checked or applied refuses it (a ConfigError saying what failed, if it was no
        WorkbenchError), and what it had changed is put back.
        """
        with self._lock:
            try:
                try:
                    config = parse_config(text, str(self.path))
                    if self._applied.config is not None and config.digest == self._applied.config.digest:
                        return self.version  # type: ignore[return-value]
                    plans = self._check_chains(config)
                except WorkbenchError:
                    raise
                except Exception as exc:  # a check that failed itself: the edit is refused, not half taken
                    raise self._unexpected("checking the edit", exc) from exc
                self._apply(config, plans)
            except WorkbenchError as error:
                if refused or self.version is not None:
                    self.refusals.append(refuse(str(self.path), error, self.version, "the workbench configuration"))
                raise
            self._applied.config = config
            self._counter += 1
            self.version = ConfigVersion(self._counter, config.digest)
            if self._counter > 1:
                logger.info("workbench configuration %s now serves %s", self.path, self.version)
            return self.version

    def _unexpected(self, doing: str, exc: Exception) -> ConfigError:
        logger.debug("%s %s failed", doing, self.path, exc_info=exc)
        return ConfigError(f"{doing} failed: {type(exc).__name__}: {exc}", path=str(self.path),
                           hint="the last good configuration keeps serving; fix the value the error names")

    def _apply(self, config: WorkbenchConfig, plans: dict[str, _ChainPlan]) -> None:
        """Change the models, then the chains; if a chain fails, the chains and models changed are put back."""
        changed: list[tuple[str, ModelEntry, ModelEntry | None]] = []
        undo: list[Callable[[], None]] = []
        try:
            changed = self._apply_models(config)  # puts back what it changed itself if a model fails
            self._apply_chains(config, plans, undo)
        except Exception as exc:
            for step in reversed(undo):
                try:
                    step()
                except Exception:  # noqa: BLE001 - the failure that started this is the one to raise
                    logger.exception("putting a chain back as it was failed")
            self._put_back(changed)
            if isinstance(exc, WorkbenchError):
                raise
            raise self._unexpected("applying the edit", exc) from exc
        for name in set(self._applied.chains) - set(config.chains):
            self._applied.chains.pop(name).unwatch()
        before = self._applied.config.models if self._applied.config is not None else {}
        for name in set(before) - set(config.models):  # only now: an unloaded model is not put back cheaply
            try:
                self._host.unload(name, forget=True)
            except WorkbenchError as exc:
                logger.warning("unloading %r, which the configuration no longer names, failed: %s", name, exc.message)

    def _overrides_after(self, name: str, config: WorkbenchConfig, chain: Chain | None) -> dict[str, Any]:
        """The overrides chain ``name`` has once ``config`` applies: the file's, under those chain.set put there
        (which stay; the file's own that it no longer sets go)."""
        new = config.overrides.get(name, {})
        if chain is None:
            return dict(new)
        before = self._applied.config
        mine = before.overrides.get(name, {}) if before is not None else {}
        return {**{k: v for k, v in chain.overrides.items() if k not in mine or k in new}, **new}

    def _kept(self, name: str, config: WorkbenchConfig) -> Chain | None:
        """The chain ``name`` as it serves now, if ``config`` keeps it (the same file): None if it is built anew."""
        before, chain = self._applied.config, self._applied.chains.get(name)
        if chain is None or before is None or before.chains.get(name) != config.chains[name]:
            return None
        return chain

    def _check_chains(self, config: WorkbenchConfig) -> dict[str, _ChainPlan]:
        """Every chain file parses, with the overrides it will have (the file's and those set live), against the
        models there will be; what to apply, by chain."""
        previous = self._applied.config.models if self._applied.config is not None else {}
        models = (set(self._host.registry.names()) - set(previous)) | set(config.models)
        # A hop's adapter: must be one its model will have: a model the file (re)loads has the adapters it names.
        adapters = {name: known for name, known in self._host.registry.adapters().items() if name in models}
        for name, entry in config.models.items():
            kept = name in previous and previous[name].load_key() == entry.load_key()
            watched = adapters.get(name, ()) if kept else ()  # a kept model keeps those a watch added, too
            adapters[name] = sorted({*(n for n, _ in entry.settings.adapters), *watched})
        plans: dict[str, _ChainPlan] = {}
        for name, path in config.chains.items():
            overrides = self._overrides_after(name, config, self._kept(name, config))
            live = sorted(set(overrides) - set(config.overrides.get(name, {})))
            try:
                text = read_text(path, f"the spec file of chain {name!r}")
                spec = parse_spec(text, known_models=models, default_name=name,
                                  allowed_modules=self._host.allow_modules(), graphs=self._host.graphs,
                                  known_adapters=adapters, base_dir=path.parent)
                for key in overrides:
                    settable_path(key, spec)
                if overrides:
                    parse_spec(apply_overrides(yaml.safe_load(text), overrides), known_models=models,
                               default_name=name, allowed_modules=self._host.allow_modules(),
                               graphs=self._host.graphs, known_adapters=adapters, base_dir=path.parent)
            except ConfigError:
                raise
            except SpecError as exc:
                hint = exc.hint
                if live:  # the edit is checked as it would serve: with what chain.set put on top
                    hint = (f"{hint}; " if hint else "") + f"checked with the values set live on chain {name!r} " \
                        f"({', '.join(live)}): chain.unset drops one"
                raise self._chain_error(name, path, exc, hint) from None
            plans[name] = _ChainPlan(text, overrides)
        for name in config.overrides:
            if name not in config.chains:
                raise ConfigError(f"overrides name chain {name!r}, which 'chains' does not list", path=str(self.path),
                                  field="overrides", hint=f"chains: {', '.join(config.chains) or 'none'}")
        return plans

    def _chain_error(self, name: str, path: Path, exc: SpecError, hint: str | None) -> ConfigError:
        return ConfigError(f"chain {name!r} ({path}): {exc.message}", path=str(self.path), field=f"chains.{name}",
                           hint=hint)

    def _apply_models(self, config: WorkbenchConfig) -> list[tuple[str, ModelEntry, ModelEntry | None]]:
        """Load or change each model as ``config`` says; what changed, to put back. If one fails, all are put back."""
        before = self._applied.config.models if self._applied.config is not None else {}
        done: list[tuple[str, ModelEntry, ModelEntry | None]] = []  # what changed, to put back if a later one fails
        try:
            for name, entry in config.models.items():
                old = before.get(name)
                if old is None or old.load_key() != entry.load_key():
                    self._load(name, entry, old)  # one that fails loads the old model back itself
                    done.append((name, entry, old))
                else:  # listed first: a swap that fails halfway is put back too (the old policies again)
                    done.append((name, entry, old))
                    self._set_policies(name, entry, old)
        except Exception:
            self._put_back(done)  # the configuration in force stays whole
            raise
        return done

    def _put_back(self, done: list[tuple[str, ModelEntry, ModelEntry | None]]) -> None:
        """Undo what :meth:`_apply_models` changed, last first."""
        for name, entry, old in reversed(done):
            try:
                if old is None:
                    self._host.unload(name, forget=True)
                elif old.load_key() != entry.load_key():
                    self._load(name, old, None)
                else:
                    self._set_policies(name, old, entry)
            except Exception:  # noqa: BLE001 - the failure that started this is the one to raise
                logger.exception("putting %r back as it was failed", name)

    def _set_policies(self, name: str, entry: ModelEntry, old: ModelEntry) -> None:
        """Change ``name``'s batching and balance policies from ``old``'s to ``entry``'s, live."""
        if not _same_policy(entry.batching, old.batching):
            self._host.set_batching(name, entry.batching or default_policy(entry.settings))
        if entry.balance != old.balance:
            self._host.set_balance(name, entry.balance or "round_robin")

    def _load(self, name: str, entry: ModelEntry, old: ModelEntry | None) -> None:
        """(Re)load ``name`` as ``entry`` says; if that fails, the model it replaced is loaded back."""
        if old is not None or name in self._host.registry.names():
            self._host.unload(name, forget=True)
        try:
            self._host.load(name, **_load_arguments(entry))
        except WorkbenchError:
            if old is not None:
                try:
                    self._host.load(name, **_load_arguments(old))
                except WorkbenchError as again:
                    logger.error("loading %r back as it was failed too: %s", name, again.message)
            raise

    def _apply_chains(self, config: WorkbenchConfig, plans: dict[str, _ChainPlan],
                      undo: list[Callable[[], None]]) -> None:
        """Build or change each chain as checked; ``undo`` collects how to put each back, should a later one fail."""
        for name, path in config.chains.items():
            try:
                self._apply_chain(name, path, plans[name], config, undo)
            except ConfigError:
                raise
            except SpecError as exc:  # checked, yet refused now: a chain.set that came between
                raise self._chain_error(name, path, exc, exc.hint) from None

    def _apply_chain(self, name: str, path: Path, plan: _ChainPlan, config: WorkbenchConfig,
                     undo: list[Callable[[], None]]) -> None:
        chain = self._kept(name, config)
        if chain is None:
            earlier = self._applied.chains.get(name)
            if earlier is not None:
                undo.append(functools.partial(self._restore_chain, name, earlier, earlier.watching))
                earlier.unwatch()
            else:
                undo.append(functools.partial(self._drop_chain, name))
            # From the text _check_chains validated, not the file read again: one saved since (half-written, or
            # wrong) must not fail the configuration half-applied, its models changed and its chains not. A
            # watch reads the file again and refuses or takes that edit as any other.
            chain = self._host.chain(plan.text, name=name, base_dir=path.parent)
            self._applied.chains[name] = chain
            if plan.overrides:
                chain.set(plan.overrides)
            if self._watch:
                chain.watch(path, self._interval_s)
            return
        # One version: the file's text as checked under the overrides checked (the file's and chain.set's, taken
        # again in case a chain.set came since). Chain has no public call for both at once: its LiveSpec does.
        live = chain._live
        undo.append(functools.partial(live.replace, *live.state()))
        live.replace(plan.text, self._overrides_after(name, config, chain))
        if chain.watching is not None:  # its watcher may have refused the file for a model only this edit brings:
            chain.watch(chain.watching, self._interval_s)  # it reads the file again (the same is no new version)

    def _restore_chain(self, name: str, chain: Chain, watching: Path | None) -> None:
        self._drop_chain(name)
        self._applied.chains[name] = chain
        if watching is not None:
            chain.watch(watching, self._interval_s)

    def _drop_chain(self, name: str) -> None:
        built = self._applied.chains.pop(name, None)
        if built is not None:
            built.unwatch()


@dataclass(frozen=True)
class _ChainPlan:
    """What a checked configuration gives one chain: its file's text as checked, and its overrides."""

    text: str
    overrides: dict[str, Any]


def _same_policy(a: BatchingPolicy | None, b: BatchingPolicy | None) -> bool:
    """Whether two policies batch alike: the same kind with the same settings (NoBatching has none)."""
    if a is None or b is None:
        return a is b
    return type(a) is type(b) and (a == b if dataclasses.is_dataclass(a) else True)


def _load_arguments(entry: ModelEntry) -> dict[str, Any]:
    arguments = dataclasses.asdict(entry.settings)
    arguments["source"] = resolve_source(arguments["source"])
    arguments["batching"] = entry.batching
    arguments["balance"] = entry.balance
    arguments["replicas"] = list(entry.replicas) if isinstance(entry.replicas, tuple) else entry.replicas
    return arguments

