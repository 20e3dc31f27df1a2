"""The strategy comparison harness: every batching x preloading x balance combination, run interleaved, read from traces."""

from __future__ import annotations

import dataclasses
import html
import logging
import platform
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.engine.balancing import BalancePolicy, parse_balance
from workbench.engine.batching import BatchingPolicy, parse_policy
from workbench.errors import (
    ModelLoadError,
    StrategyError,
    UnknownModelError,
    WorkbenchError,
    WorkloadError,
    describe,
)
from workbench.experiments.workloads import (
    ClosedLoop, PoissonArrivals, Workload, WorkloadResult, as_inputs, not_whole,
)
from workbench.models.devices import dtype_name, resolve_device, resolve_dtype
from workbench.models.registry import RAY_DEVICE
from workbench.models.remote import REMOTE_DEVICE
from workbench.engine.preloading import KeepWarm, PreloadingStrategy, parse_preloading
from workbench.tables import MISSING, Readable, float_format
from workbench.tracing import Trace
from workbench.tracing import attributes as attr
from workbench.tracing.clock import now_ns

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from workbench.bench import Workbench
    from workbench.chains.cache import ResponseCache
    from workbench.chains.chain import Chain

log = logging.getLogger(__name__)

# What the environment says of what this machine cannot see: a served model's dtype and hardware.
UNKNOWN = "unknown"

# What the label columns hold when a comparison leaves that axis as the workbench has it.
UNCHANGED = "(as set)"

# Figures given with an interval get ``_lo`` and ``_hi`` columns after them.
_OVER_REPEATS = ("requests_per_s", "output_tokens_per_s", "cold_start_s", "first_result_s")  # min-max over repeats
_BOOTSTRAPPED = ("e2e_p50_ms", "e2e_p95_ms", "e2e_p99_ms", "ttft_p50_ms", "ttft_p95_ms", "tpot_ms")


# Shown in the readable table only when the comparison had cache arms.
_CACHE_FIGURES = ("cache_hit_rate", "prefix_tokens_reused", "prefix_kv_mb")


def _cache_figures(passes: pd.DataFrame, calls: pd.DataFrame) -> dict[str, float]:
    """A strategy's exact-cache hit rate (hits per lookup; 0 without lookups), prefix tokens reused per model call,
    and the most prefix KV a pass ended with (frames from before these were measured have none)."""
    lookups = passes["cache_lookups"].sum() if "cache_lookups" in passes else 0
    prefix = calls["prefix_tokens"].astype("Float64").fillna(0) if "prefix_tokens" in calls else None
    return {
        "cache_hit_rate": float(passes["cache_hits"].sum() / lookups) if lookups else 0.0,
        "prefix_tokens_reused": float(prefix.mean()) if prefix is not None and len(prefix) else float("nan"),
        "prefix_kv_mb": float(passes["prefix_kv_mb"].max()) if "prefix_kv_mb" in passes else float("nan"),
    }


def _with_bounds(*columns: str) -> list[str]:
    return [name for column in columns for name in
            ((column, f"{column}_lo", f"{column}_hi") if column in _OVER_REPEATS + _BOOTSTRAPPED else (column,))]


# The axes a comparison may vary; each strategy is one value on each.
AXES = ("batching", "preloading", "balance", "cache")
# The cache arms a comparison may run the chain's LLM hops under (each hop's own ``cache:`` is replaced).
CACHE_ARMS = ("off", "exact", "prefix", "exact+prefix")

TABLE_COLUMNS = _with_bounds(
    *AXES,
    "requests_per_s",
    "rank",
    "rank_group",
    "distinguishable",
    "output_tokens_per_s",
    "e2e_p50_ms",
    "e2e_p95_ms",
    "e2e_p99_ms",
    "p95_few_samples",
    "p99_few_samples",
    "n",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "ttft_p95_few_samples",
    "ttft_n",
    "tpot_ms",
    "tpot_n",
    "mean_batch_size",
    "padding_fraction",
    "cold_start_s",
    "first_result_s",
    "peak_weights_mb",
    "peak_cuda_mb",
    "replica_load",
    "errors",
    "repeats",
    "cache_hit_rate",
    "prefix_tokens_reused",
    "prefix_kv_mb",
)

# Spread: latency percentiles get a percentile-bootstrap interval over the runs (or model calls)
# of every repeat, seeded so the same samples give the same interval; throughput, cold start and
# first result are one figure per pass, so their spread is the min-max over repeats.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_SEED = 0
# A p99 needs about 100 samples, a p95 about 20, before it says anything the largest sample does not.
FEW_FOR_P95 = 20
FEW_FOR_P99 = 100
# Each percentile flagged when taken from too few samples: its flag column, the column counting them, how few, and
# what readable() notes of it (it marks the figure `*`). TTFT is over model calls, the others over runs.
_FEW_SAMPLES = {
    "e2e_p95_ms": ("p95_few_samples", "n", FEW_FOR_P95, f"p95 from fewer than {FEW_FOR_P95} runs"),
    "e2e_p99_ms": ("p99_few_samples", "n", FEW_FOR_P99, f"p99 from fewer than {FEW_FOR_P99} runs"),
    "ttft_p95_ms": ("ttft_p95_few_samples", "ttft_n", FEW_FOR_P95,
                    f"ttft_p95 from fewer than {FEW_FOR_P95} model calls"),
}


@dataclass(frozen=True)
class Strategy:
    """One combination under comparison; ``None`` on an axis leaves it as the workbench has it."""

    batching: BatchingPolicy | None
    preloading: PreloadingStrategy | None
    balance: BalancePolicy | None = None
    cache: str | None = None  # one of CACHE_ARMS

    @property
    def labels(self) -> tuple[str, str, str, str]:
        return (
            self.batching.name if self.batching is not None else UNCHANGED,
            self.preloading.name if self.preloading is not None else UNCHANGED,
            self.balance.name if self.balance is not None else UNCHANGED,
            self.cache if self.cache is not None else UNCHANGED,
        )


def _listed(value: Any, axis: str, one: tuple[type, ...], what: str, example: str) -> list[Any]:
    """An axis's items: ``value`` itself where it is one (of the types ``one``), else the items it lists."""
    if isinstance(value, one):
        return [value]
    if not isinstance(value, Iterable):
        raise StrategyError(f"{axis}={value!r:.60} is neither {what} nor a list of them",
                            hint=f"e.g. {axis}={example}")
    return list(value)


def _policies(batching: Iterable[BatchingPolicy | str] | BatchingPolicy | str | None) -> list[BatchingPolicy | None]:
    if batching is None:
        return [None]
    policies: list[BatchingPolicy | None] = []
    for item in _listed(batching, "batching", (str, BatchingPolicy), "a batching policy",
                        '["none", "static:16", "dynamic:16:5ms"]'):
        if isinstance(item, str):
            policies.append(parse_policy(item))
        elif isinstance(item, BatchingPolicy):
            policies.append(item)
        else:
            raise StrategyError(
                f"batching {item!r} is a {type(item).__name__}, not a policy",
                hint='give policy objects such as wb.DynamicBatching(16, 5) or names such as "dynamic:16:5ms"',
            )
    return _distinct(policies, "batching")


def _preloadings(
    preloading: Iterable[PreloadingStrategy | str] | PreloadingStrategy | str | None,
) -> list[PreloadingStrategy | None]:
    if preloading is None:
        return [None]
    items = _listed(preloading, "preloading", (str, PreloadingStrategy), "a preloading strategy",
                    '["lazy", "eager", "prefetch"]')
    return _distinct([parse_preloading(p) for p in items], "preloading")


def _balances(balance: Iterable[BalancePolicy | str] | BalancePolicy | str | None) -> list[BalancePolicy | None]:
    if balance is None:
        return [None]
    items = _listed(balance, "balance", (str, BalancePolicy), "a balance policy", '["round_robin", "least_loaded"]')
    return _distinct([parse_balance(b) for b in items], "balance")


@dataclass(frozen=True)
class _CacheArm:
    name: str


def _caches(cache: Iterable[str] | str | None) -> list[str | None]:
    if cache is None:
        return [None]
    arms = []
    for item in _listed(cache, "cache", (str,), "a cache arm", '["off", "exact"]'):
        if item not in CACHE_ARMS:
            raise StrategyError(f"cache {item!r:.60} is not a cache arm",
                                hint=f"cache= takes a list of {', '.join(CACHE_ARMS)}")
        arms.append(_CacheArm(item))
    return [arm.name for arm in _distinct(arms, "cache")]


def _distinct(items: list[Any], axis: str) -> list[Any]:
    if not items:
        raise StrategyError(f"{axis}=[] leaves nothing to compare", hint=f"list at least one, or leave {axis}=None")
    labels = [item.name for item in items]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise StrategyError(f"{axis} {twice[0]!r} is listed twice", hint="each strategy is one row: list it once")
    return items


def _label(*labels: str) -> str:
    """A strategy's name in plots and the progress bar: the axes that were set, joined."""
    return " + ".join(part for part in labels if part != UNCHANGED) or UNCHANGED


def _replica_load(calls: pd.DataFrame) -> str | None:
    """Each replica's share of a strategy's model calls, as ``m#0 62% · m#1 38%`` (None without replicas)."""
    served = calls["replica"].dropna()
    if served.empty:
        return None
    shares = served.value_counts(normalize=True).sort_index()
    return " · ".join(f"{replica} {share:.0%}" for replica, share in shares.items())


def _percentiles(values: pd.Series, name: str, qs: dict[str, float]) -> dict[str, float]:
    """Each quantile of ``values`` as ``{column: value}``, with its bootstrap interval as ``column_lo/_hi``.

    The interval is the central ``BOOTSTRAP_LEVEL`` of the quantile over ``BOOTSTRAP_RESAMPLES``
    resamples drawn with replacement (``numpy.random.default_rng(BOOTSTRAP_SEED)``), widened to
    take in the estimate itself where a small sample's resamples miss it; NaN with fewer than
    two samples, which say nothing about spread.
    """
    import numpy as np

    data = values.dropna().to_numpy(dtype=float)
    columns = [f"{name}_{label}" if label else name for label in qs]
    if not len(data):
        return {f"{c}{end}": float("nan") for c in columns for end in ("", "_lo", "_hi")}
    points = np.quantile(data, list(qs.values()))
    figures = dict(zip(columns, map(float, points)))
    if len(data) < 2:
        return figures | {f"{c}{end}": float("nan") for c in columns for end in ("_lo", "_hi")}
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    estimates = np.empty((BOOTSTRAP_RESAMPLES, len(qs)))
    chunk = max(1, 2_000_000 // len(data))  # resample in chunks: memory stays small for long runs
    for start in range(0, BOOTSTRAP_RESAMPLES, chunk):
        rows = min(chunk, BOOTSTRAP_RESAMPLES - start)
        draws = data[rng.integers(0, len(data), size=(rows, len(data)))]
        estimates[start:start + rows] = np.quantile(draws, list(qs.values()), axis=1).T
    tail = (1 - BOOTSTRAP_LEVEL) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail], axis=0)
    for column, point, lo, hi in zip(columns, points, low, high):
        figures[f"{column}_lo"] = float(min(lo, point))
        figures[f"{column}_hi"] = float(max(hi, point))
    return figures


def _over_repeats(passes: pd.DataFrame, column: str) -> dict[str, float]:
    """The median of a per-pass figure, and its min-max over repeats (NaN from one repeat: no spread seen)."""
    values = passes[column].dropna()
    spread = len(values) >= 2
    return {
        column: float(values.median()) if len(values) else float("nan"),
        f"{column}_lo": float(values.min()) if spread else float("nan"),
        f"{column}_hi": float(values.max()) if spread else float("nan"),
    }


def _overlapping(table: pd.DataFrame) -> dict[Any, list[Any]] | None:
    """For each row, the other rows whose throughput interval overlaps its own; None without intervals."""
    lo, hi = table["requests_per_s_lo"], table["requests_per_s_hi"]
    if not len(table) or lo.isna().any() or hi.isna().any():
        return None
    return {i: [j for j in table.index if j != i and lo[i] <= hi[j] and lo[j] <= hi[i]] for i in table.index}


def _rank(table: pd.DataFrame) -> pd.DataFrame:
    """Rank strategies by throughput, grouping those whose throughput intervals overlap.

    ``rank`` orders by the median requests/s (1 is the highest). Going down that order, a
    strategy whose interval overlaps the interval of its group's best stays in the group;
    one below it starts the next ``rank_group``. ``distinguishable`` is True where a
    strategy's interval overlaps no other strategy's. Without intervals (one repeat) there
    are no groups and nothing is told apart: both are missing.
    """
    import pandas as pd

    point, lo, hi = (table[f"requests_per_s{end}"] for end in ("", "_lo", "_hi"))
    table["rank"] = point.rank(ascending=False, method="first").astype("Int64")
    groups = pd.Series(pd.NA, index=table.index, dtype="Int64")
    apart = pd.Series(pd.NA, index=table.index, dtype="boolean")
    overlapping = _overlapping(table)
    if overlapping is not None:
        group, leader = 0, None
        for i in point.sort_values(ascending=False, kind="stable").index:
            if leader is None or hi[i] < lo[leader]:
                group, leader = group + 1, i
            groups[i] = group
            apart[i] = not overlapping[i]
    table["rank_group"] = groups
    table["distinguishable"] = apart
    return table


class _MemoryWatch:
    """Peak memory while the block runs: model weights held (sampled every few ms) and torch's CUDA peak.

    ``cuda_peak`` is the sum over CUDA devices of ``torch.cuda.max_memory_allocated`` (weights,
    KV cache and activations), NaN on a machine without CUDA.
    """

    def __init__(self, bench: Workbench, every_s: float = 0.005) -> None:
        self._bench = bench
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="workbench-memory-watch", daemon=True)
        self.weights_peak = _resident_bytes(bench)
        self.cuda_peak = float("nan")

    def _sample(self) -> None:
        while not self._stop.wait(self._every_s):
            self.weights_peak = max(self.weights_peak, _resident_bytes(self._bench))

    def __enter__(self) -> _MemoryWatch:
        import torch

        if torch.cuda.is_available():
            for device in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(device)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self.weights_peak = max(self.weights_peak, _resident_bytes(self._bench))
        if torch.cuda.is_available():
            self.cuda_peak = float(sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())))


def _prefix_kv_bytes(bench: Workbench, models: Iterable[str]) -> int:
    """The prefix KV the workers of ``models`` hold now (those loaded; a model's every replica)."""
    return sum(cache.bytes for name in models if bench.registry.is_loaded(name)
               for worker in bench.engine.replicas_of(name)
               if (cache := getattr(worker.backend, "prefix_cache", None)) is not None)


def _resident_bytes(bench: Workbench) -> int:
    return sum(model.memory_bytes for model in bench.registry.loaded())


class Comparison:
    """What :func:`compare` measured: one row per strategy in :meth:`table`, every run in :meth:`samples`.

    ``samples()`` has one row per measured chain run, ``calls()`` one per model call, and
    ``passes()`` one per strategy and repeat (throughput, cold start, first result, memory).
    """

    def __init__(
        self,
        chain: str,
        strategies: Sequence[tuple[str, str, str]],
        samples: pd.DataFrame,
        calls: pd.DataFrame,
        passes: pd.DataFrame,
        environment: Mapping[str, Any],
    ) -> None:
        self.chain = chain
        # Strategies and frames made before an axis existed (a saved comparison) hold it as left unchanged.
        self.strategies = [tuple(labels) + (UNCHANGED,) * (len(AXES) - len(labels)) for labels in strategies]
        samples, calls, passes = (frame.assign(**{axis: UNCHANGED for axis in AXES if axis not in frame})
                                  for frame in (samples, calls, passes))
        self._samples, self._calls, self._passes = samples, calls, passes
        self.environment = dict(environment)

    def samples(self) -> pd.DataFrame:
        """One row per measured chain run: strategy, repeat, input index, ok, E2E latency, output, and a failed run's
        error (None for a run that finished)."""
        return self._samples.copy()

    def calls(self) -> pd.DataFrame:
        """One row per model call of the measured runs that finished (a failed run's calls are left out, as the run
        is): TTFT, TPOT, tokens, batch id and size, padding, replica."""
        return self._calls.copy()

    def passes(self) -> pd.DataFrame:
        """One row per strategy and repeat: wall time, requests/s, tokens/s, cold start, first result, memory."""
        return self._passes.copy()

    def table(self) -> pd.DataFrame:
        """One row per strategy: throughput, latency percentiles with their spread, batching, cold start, memory.

        Latency percentiles pool the runs of every repeat, each with a 95% bootstrap interval
        over those runs (``_lo`` / ``_hi``; 1000 resamples, seed 0); ``n`` runs finished;
        ``p95_few_samples`` flags a p95 taken from fewer than 20 of them, ``p99_few_samples`` a
        p99 taken from fewer than 100. TTFT and ``tpot_ms``
        (the median time per output token) are over the model calls of the runs that finished, counted in
        ``ttft_n`` and ``tpot_n``; ``ttft_p95_few_samples`` flags a TTFT p95 taken from fewer than 20 calls.
        Throughput, cold start and time to first result are medians over repeats, their interval
        the min-max over repeats (missing after one repeat). ``rank``,
        ``rank_group`` and ``distinguishable`` rank throughput: strategies in one group have
        overlapping intervals, so the measurement does not tell them apart. ``mean_batch_size``
        is the mean size of the batches the calls ran in, ``padding_fraction`` the share of
        padded prompt cells that were padding; peak memory is the largest of any repeat.
        """
        import pandas as pd

        rows = []
        for labels in self.strategies:
            runs = self._of(self._samples, labels)
            calls = self._of(self._calls, labels)
            passes = self._of(self._passes, labels)
            ok = runs[runs["ok"]]
            batches = calls.drop_duplicates(["repeat", "batch_id"])
            cells = float((calls["tokens_in"] + calls["padding_tokens"]).sum())
            row = {
                **dict(zip(AXES, labels)),
                **_over_repeats(passes, "requests_per_s"),
                **_over_repeats(passes, "output_tokens_per_s"),
                **_percentiles(ok["e2e_ms"], "e2e", {"p50_ms": 0.50, "p95_ms": 0.95, "p99_ms": 0.99}),
                "n": len(ok),
                **_percentiles(calls["ttft_ms"], "ttft", {"p50_ms": 0.50, "p95_ms": 0.95}),
                "ttft_n": int(calls["ttft_ms"].notna().sum()),
                **_percentiles(calls["tpot_ms"], "tpot_ms", {"": 0.50}),
                "tpot_n": int(calls["tpot_ms"].notna().sum()),
                "mean_batch_size": float(batches["batch_size"].mean()) if len(batches) else float("nan"),
                "padding_fraction": float(calls["padding_tokens"].sum()) / cells if cells else float("nan"),
                **_over_repeats(passes, "cold_start_s"),
                **_over_repeats(passes, "first_result_s"),
                "peak_weights_mb": passes["peak_weights_mb"].max(),
                "peak_cuda_mb": passes["peak_cuda_mb"].max(),
                "replica_load": _replica_load(calls),
                "errors": int((~runs["ok"]).sum()),
                "repeats": len(passes),
                **_cache_figures(passes, calls),
            }
            rows.append({**row, **{flag: row[count] < few for flag, count, few, _ in _FEW_SAMPLES.values()}})
        return _rank(pd.DataFrame(rows))[TABLE_COLUMNS]

    def readable(self) -> Readable:
        """:meth:`table` as a person reads it: each figure with its interval in brackets, flags and ranks marked."""
        import pandas as pd

        table = self.table()
        # The balance axis and the load per replica only where the comparison had replicas to speak of.
        axes = [a for a in AXES if a not in ("balance", "cache") or (table[a] != UNCHANGED).any()]
        shown = pd.DataFrame({axis: table[axis] for axis in axes})
        overlapping = _overlapping(table)
        # "2 ≈1,3": second by throughput, not told apart from the first and the third.
        shown["rank"] = [
            MISSING if overlapping is None or pd.isna(table.at[i, "rank"]) else
            f"{table.at[i, 'rank']}" + (" ≈" + ",".join(str(r) for r in sorted(table.loc[overlapping[i], "rank"]))
                                        if overlapping[i] else "")
            for i in table.index
        ]
        figures = [c for c in TABLE_COLUMNS[len(AXES):] if c not in ("rank", "rank_group", "distinguishable",
                   *(flag for flag, *_ in _FEW_SAMPLES.values()), "replica_load") and not c.endswith(("_lo", "_hi"))
                   and (c not in _CACHE_FIGURES or (table["cache"] != UNCHANGED).any())]
        for column in figures:
            values = table[column]
            if not pd.api.types.is_float_dtype(values.dtype):
                shown[column] = Readable(values.to_frame()).column(column)
                continue
            fmt = float_format(column, values.dropna())
            texts = []
            for i in table.index:
                value = values[i]
                text = MISSING if pd.isna(value) else fmt(value)
                if column in _OVER_REPEATS + _BOOTSTRAPPED and not pd.isna(table.at[i, f"{column}_lo"]):
                    text += f" ({fmt(table.at[i, f'{column}_lo'])}–{fmt(table.at[i, f'{column}_hi'])})"
                if column in _FEW_SAMPLES and table.at[i, _FEW_SAMPLES[column][0]] and not pd.isna(value):
                    text += " *"
                texts.append(text)
            shown[column] = texts
        if table["replica_load"].notna().any():
            shown.insert(len(axes) + 1, "replica_load", table["replica_load"].fillna(MISSING))
        notes = [
            "(lo–hi): latency percentiles pool every repeat's runs, with a 95% bootstrap interval "
            f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); throughput, cold start and first "
            "result are medians over repeats, with their min–max over repeats.",
            "rank: by requests_per_s; ≈ names the ranks whose intervals overlap its own: not distinguishable.",
        ]
        if (table["repeats"] < 2).any():
            notes.append("one repeat gives no spread in throughput, so no ranking: use repeats >= 2.")
        if (table["errors"] > 0).any():
            notes.append("errors: failed runs, left out of requests/s and the latency figures; "
                         ".samples() has each failed run's error.")
        few = [said for column, (flag, _, _, said) in _FEW_SAMPLES.items()
               if (table[flag] & table[column].notna()).any()]
        if few:
            notes.append(f"* {', '.join(few)}: little more than the slowest one.")
        return Readable(shown, numeric=["rank", *figures], notes=notes)

    @staticmethod
    def _of(frame: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
        keep = frame[AXES[0]] == labels[0]
        for axis, label in zip(AXES[1:], labels[1:]):
            keep &= frame[axis] == label
        return frame[keep]

    def replica_load(self) -> pd.DataFrame:
        """One row per strategy and replica: the model calls it served, its share of them, and their latency.

        ``calls`` counts successful calls over every repeat; ``share`` is of the strategy's calls
        to replicated models; ``e2e_p50_ms`` / ``e2e_p95_ms`` are the calls' own latency (queue
        included), so a slow replica shows here even when the policy sends it little.
        """
        import pandas as pd

        columns = [*AXES, "replica", "calls", "share", "e2e_p50_ms", "e2e_p95_ms"]
        rows = []
        for labels in self.strategies:
            calls = self._of(self._calls, labels).dropna(subset=["replica"])
            for replica, group in calls.groupby("replica", sort=True):
                rows.append({**dict(zip(AXES, labels)), "replica": replica, "calls": len(group),
                             "share": len(group) / len(calls), "e2e_p50_ms": group["e2e_ms"].quantile(0.50),
                             "e2e_p95_ms": group["e2e_ms"].quantile(0.95)})
        return pd.DataFrame(rows, columns=columns)

    def plot(self) -> Figure:
        """Throughput against p95 latency with error bars (one point per strategy), and each strategy's latency CDF.

        The bars are the intervals of :meth:`table`: min-max over repeats for throughput, the
        bootstrap interval for p95. Strategies are named in one legend beside both panels, so
        no label sits on a point or on another label, and none is cut off at an edge.
        """
        import numpy as np
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        from workbench.tracing.figure import DisplayFigure

        table = self.table()
        fig = DisplayFigure(figsize=(12, 4.2), layout="constrained")
        scatter, cdf = fig.subplots(1, 2)
        for index, row in enumerate(table.itertuples()):
            # Ten colours, then the next marker: every strategy keeps a look of its own.
            colour, marker = f"C{index % 10}", "osD^v<>"[index // 10 % 7]
            labels = tuple(getattr(row, axis) for axis in AXES)
            label = _label(*labels)
            x, y = row.e2e_p95_ms, row.requests_per_s
            x_lo, x_hi, y_lo, y_hi = row.e2e_p95_ms_lo, row.e2e_p95_ms_hi, row.requests_per_s_lo, row.requests_per_s_hi
            # No bar where there is no interval (one repeat, one run): a bar of zero would claim no spread.
            xerr = None if np.isnan(x_lo) else [[x - x_lo], [x_hi - x]]
            yerr = None if np.isnan(y_lo) else [[y - y_lo], [y_hi - y]]
            scatter.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, color=colour, markersize=6, capsize=3,
                             elinewidth=1, zorder=3, label=label)
            runs = self._of(self._samples, labels)
            latencies = np.sort(runs.loc[runs["ok"], "e2e_ms"].to_numpy(dtype=float))
            if len(latencies):
                cdf.step(latencies, np.arange(1, len(latencies) + 1) / len(latencies), where="post", color=colour)
        scatter.set_xlabel("E2E p95 latency (ms)")
        scatter.set_ylabel("throughput (chain runs/s)")
        scatter.set_title("throughput vs tail latency (up and left is better)\n"
                          "bars: min–max over repeats (runs/s), 95% bootstrap (p95)", loc="left", fontsize=9)
        scatter.grid(alpha=0.3)
        cdf.set_xlabel("E2E latency per chain run (ms)")
        cdf.set_ylabel("fraction of runs")
        lo, hi = cdf.dataLim.intervalx  # (inf, -inf) where no run finished: nothing to scale
        # Strategies that differ by orders of magnitude: a log axis keeps both readable.
        if 0 < lo <= hi and hi / lo >= 10:
            cdf.set_xscale("log")
            cdf.xaxis.set_major_formatter(ScalarFormatter())
            cdf.xaxis.set_minor_formatter(NullFormatter())
        # Within one decade a log axis would have no labelled tick at all: the linear one reads better.
        cdf.set_ylim(0, 1.02)
        cdf.set_title("latency CDF (left is better)", loc="left", fontsize=9)
        cdf.grid(alpha=0.3)
        if len(table):
            # Outside the axes, in the constrained layout: it takes its own room instead of covering data.
            fig.legend(*scatter.get_legend_handles_labels(), loc="outside right upper", fontsize=8,
                       title="strategy", title_fontsize=8)
        fig.suptitle(f"chain {self.chain}: {self._workload_text()}", fontsize=10)
        return fig

    def save(self, path: str | Path) -> Path:
        """Write :meth:`table` with the environment as extra columns, to ``.csv`` or ``.parquet``."""
        path = Path(path).expanduser()
        table = self.table()
        # The environment says what was asked for; a column of the table (repeats: the passes each strategy ran, fewer
        # after a Ctrl-C) says what was measured and stays: an environment key it has goes in as KEY_requested.
        table = table.assign(**{key if key not in table.columns else f"{key}_requested": value
                                for key, value in self.environment.items()})
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".parquet"):
            raise StrategyError(
                f"cannot save a comparison as {path.name!r}: unknown file type {suffix or '(none)'!r}",
                hint="end the path with .csv or .parquet",
            )
        try:
            if suffix == ".csv":
                table.to_csv(path, index=False)
            else:
                table.to_parquet(path, index=False)
        except OSError as exc:  # no such folder, no permission, a full disk: the comparison itself is still here
            raise StrategyError(
                f"cannot save the comparison to {str(path)!r}: {exc.strerror or exc}",
                hint="save it again to a folder that exists and that you can write: the comparison is kept",
            ) from exc
        return path

    def _workload_text(self) -> str:
        env = self.environment
        load = (
            f"Poisson arrivals at {env['arrival_rate']:g}/s"
            if env.get("arrival_rate")
            else f"closed loop at concurrency {env.get('concurrency')}"
        )
        inputs, repeats = env.get("inputs"), env.get("repeats")
        served = f"{env.get('model')} on {env.get('device')} ({env.get('dtype')})" if env.get("model") else "no model"
        return (
            f"{inputs} input{'s' * (inputs != 1)}, {load}, {env.get('warmup')} warm-up, "
            f"{repeats} repeat{'s' * (repeats != 1)}; {served}"
        )

    def _strategies_text(self) -> str:
        return f"{len(self.strategies)} {'strategy' if len(self.strategies) == 1 else 'strategies'}"

    def __repr__(self) -> str:
        return f"<Comparison of {self._strategies_text()} on chain {self.chain!r}: {self._workload_text()}>"

    def _repr_html_(self) -> str:
        head = (
            f"<p>Comparison of {self._strategies_text()} on chain <b>{html.escape(self.chain)}</b>: "
            f"{html.escape(self._workload_text())}</p>"
        )
        return head + self.readable().to_html()


def _environment(bench: Workbench, chain: Chain, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Say what ran: device, dtype and source of the chain's models, versions, platform, workload settings."""
    import torch
    import transformers

    from workbench._version import __version__

    devices, dtypes, sources = [], [], []
    for name in chain.spec.models():
        try:
            loaded = bench.registry.get(name)
            device, dtype = str(loaded.device), dtype_name(loaded.dtype) if loaded.dtype is not None else UNKNOWN
        except UnknownModelError:  # registered, not loaded now: what it loads as
            planned = bench.registry.settings(name)
            if planned.remote:
                device, dtype = REMOTE_DEVICE, UNKNOWN
            else:
                resolved = resolve_device(planned.device)
                device, dtype = str(resolved), dtype_name(resolve_dtype(planned.dtype, resolved))
        devices.append(device)
        dtypes.append(dtype)
        sources.append(bench.registry.settings(name).source)
    return {
        "chain": chain.name,
        "model": ",".join(chain.spec.models()),
        "model_source": ",".join(sources),
        "device": ",".join(sorted(set(devices))),
        "dtype": ",".join(sorted(set(dtypes))),
        "accelerator": ",".join(sorted({_accelerator(device) for device in devices})),
        **settings,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "workbench_version": __version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


def _accelerator(device: str) -> str:
    """What computes on ``device``: the GPU's name, this machine's processor, or unknown for a server or Ray actors."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    if device == REMOTE_DEVICE:
        return f"{UNKNOWN} (on a server)"
    if device == RAY_DEVICE:
        return f"{UNKNOWN} (in Ray actors: bench.replicas() has their devices)"
    return platform.processor() or platform.machine()


def _measure(
    bench: Workbench, chain: Chain, result: WorkloadResult, started_ns: int
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """Per-run, per-call and per-pass figures of one workload pass, read from its spans."""
    import pandas as pd

    table = Trace(span for run in result.runs for span in run.trace.spans).table()
    roots = table[(table["depth"] == 0) & table["name"].str.startswith("chain ")]
    ends = dict(zip(roots["context.trace_id"], roots["end_time"].map(lambda t: t.value)))
    runs = pd.DataFrame(
        {
            "input": range(len(result.runs)),
            "ok": [run.ok for run in result.runs],
            # From arrival, not start: in an open loop a run that starts late was still due.
            "e2e_ms": [
                (ends[format(run.trace_id, "032x")] - arrival) / 1e6
                for run, arrival in zip(result.runs, result.arrivals_ns)
            ],
            "output": [run.output if run.ok else None for run in result.runs],
            "error": [None if run.ok else describe(run.error) for run in result.runs],  # type: ignore[arg-type]
        }
    )
    # A failed run's model calls and served answers are left out, as the run is: its TTFT, TPOT and tokens
    # counted beside the figures of the runs that finished, while requests/s and E2E counted only those.
    finished = table["context.trace_id"].isin({format(run.trace_id, "032x") for run in result.runs if run.ok})
    llm = table[table["name"].str.startswith(attr.TEXT_COMPLETION) & (table["status_code"] == "OK") & finished]
    calls = pd.DataFrame(
        {
            "hop": llm["hop"],
            "ttft_ms": llm["ttft_ms"],
            "tpot_ms": llm["tpot_ms"],
            "tokens_in": llm["tokens_in"],
            "tokens_out": llm["tokens_out"],
            "batch_id": llm.get(f"attributes.{attr.BATCH_ID}"),
            "batch_size": llm["batch_size"],
            "padding_tokens": llm.get(f"attributes.{attr.PADDING_TOKENS}"),
            "replica": llm.get(f"attributes.{attr.REPLICA}"),
            "prefix_tokens": llm.get(f"attributes.{attr.PREFIX_TOKENS}"),
            "e2e_ms": llm["duration_ms"],
        }
    ).reset_index(drop=True)
    calls = calls.astype({c: "Int64" for c in ("tokens_in", "tokens_out", "batch_id", "batch_size", "padding_tokens",
                                                "prefix_tokens")})
    hops = table[table["name"].str.startswith("hop ")]
    lookups = hops.get(f"attributes.{attr.CACHE_HIT}")
    looked = lookups.dropna() if lookups is not None else None
    # An exact hit delivered the tokens the model once wrote for it: output, though no model call made them now.
    served = hops[finished.loc[hops.index]].get(f"attributes.{attr.CACHE_TOKENS_OUT}")
    tokens_out = float(calls["tokens_out"].sum()) + (float(served.fillna(0).sum()) if served is not None else 0.0)
    wall = result.wall_s
    models = set(chain.spec.models())
    cold = [
        float(a[attr.COLD_START_S])  # type: ignore[arg-type]
        for s in bench.traces().spans
        if attr.COLD_START_S in (a := s.attributes or {})
        and a.get(attr.MODEL_NAME) in models
        and started_ns <= (s.start_time or 0) <= result.ended_ns
    ]
    first = result.first_result_ns
    figures = {
        "wall_s": wall,
        "requests_per_s": int(runs["ok"].sum()) / wall if wall > 0 else float("nan"),
        "output_tokens_per_s": tokens_out / wall if wall > 0 else float("nan"),
        "cold_start_s": sum(cold),
        "first_result_s": (first - started_ns) / 1e9 if first is not None else float("nan"),
        "cache_lookups": len(looked) if looked is not None else 0,
        "cache_hits": int(looked.astype(bool).sum()) if looked is not None else 0,
    }
    return runs, calls, figures


def compare(
    chain: Chain,
    inputs: Iterable[Mapping[str, Any]],
    batching: Iterable[BatchingPolicy | str] | BatchingPolicy | str | None = None,
    preloading: Iterable[PreloadingStrategy | str] | PreloadingStrategy | str | None = None,
    *,
    balance: Iterable[BalancePolicy | str] | BalancePolicy | str | None = None,
    cache: Iterable[str] | str | None = None,
    concurrency: int = 8,
    repeats: int = 3,
    warmup: int = 1,
    arrival_rate: float | None = None,
    seed: int = 0,
    progress: bool = True,
    on_pass: Callable[[Comparison], None] | None = None,
) -> Comparison:
    """Run ``inputs`` through ``chain`` under every batching x preloading x balance combination and compare them.

    ``batching`` items are policies or their names (``"none"``, ``"static:8"``,
    ``"dynamic:16:5ms"``, ``"continuous"``, ...); ``preloading`` items are what
    ``bench.set_preloading`` takes (``"lazy"``, ``"eager"``, ``"prefetch"``, ...); ``balance``
    items are what ``bench.set_balance`` takes (``"round_robin"``, ``"least_loaded"``, ...), for
    the chain's models with replicas (the table's ``replica_load`` and :meth:`Comparison.replica_load`
    say how each policy spread the calls). ``cache`` items are ``"off"``, ``"exact"``, ``"prefix"`` and
    ``"exact+prefix"``: the chain's LLM hops run with that ``cache:`` in place of their own (``exact`` only on
    greedy hops, ``prefix`` only on prompts with fixed leading text), each pass starting from empty caches (the
    warm-up runs' answers are dropped before the measured runs, which would otherwise hit on them); the
    table adds ``cache_hit_rate`` (exact hits per lookup), ``prefix_tokens_reused`` (per model call) and
    ``prefix_kv_mb`` (the prefix KV the chain's models held at the end of a pass; 0 for an arm that caches no
    prefix). An exact hit calls no model, so TTFT and TPOT
    are over the calls that missed; its stored answer's tokens count in ``output_tokens_per_s``, as delivered output. ``None`` leaves that axis as the workbench has it (a chain's own ``cache:`` hops
    also start each pass from empty caches). Each pass runs every input once, closed loop
    at ``concurrency`` runs in flight, or open loop with Poisson arrivals at ``arrival_rate``
    runs/s (seeded by ``seed``); ``warmup`` runs before each pass are left out of its figures. A strategy one of the
    chain's models cannot run (continuous batching where it cannot batch so, weights for replicas it lacks, a keep-warm
    budget smaller than the model) is refused before the first pass, as are balance policies for a chain whose models
    each run one replica (every policy would send every call to it).

    Repeats are interleaved (every strategy's first pass, then every strategy's second, the
    order rotating each time) so that drift on a shared machine hits all of them alike. Before
    each pass under a preloading strategy the chain's models are unloaded, so its cold start
    is real, and ``bench.prepare(chain)`` runs as part of the pass (a model it cannot load fails the pass's runs, each
    with its error, as it would under lazy loading). The workbench's batching
    policies, balance policies and preloading are put back afterwards, also on error or Ctrl-C. A Ctrl-C raises
    :class:`CompareInterrupted` with the passes that finished on its ``comparison``.

    ``on_pass``, if given, is called after every pass with a Comparison of the passes so far
    (strategies not run yet have rows without figures): a dashboard fills in from it.
    """
    bench = chain.bench
    items = as_inputs(inputs)
    workload: Workload
    if arrival_rate is not None:
        workload = PoissonArrivals(items, rate=arrival_rate, seed=seed, warmup=warmup)
    else:
        workload = ClosedLoop(items, concurrency=concurrency, warmup=warmup)
    bench.check_open(f"compare strategies on chain {chain.name!r}")
    workload.check(chain)  # refuse bad input before any model is touched
    if wrong := not_whole("repeats", repeats, 1):
        raise StrategyError(wrong, hint="repeats=3 is a good start")
    kept = bench.tracing.index.max_traces
    if len(items) > kept:  # the pass's first runs would have lost their traces by the time it is measured
        raise WorkloadError(
            f"{len(items)} inputs are more runs per pass than the {kept} whose traces the workbench keeps, "
            "and a comparison reads its figures from those traces",
            hint=f"compare on at most {kept} inputs: a random sample of them measures the strategies as well",
        )
    preloadings, policies, balances, caches = _preloadings(preloading), _policies(batching), _balances(balance), \
        _caches(cache)
    _check_models_take(bench, chain, preloadings, policies, balances)
    strategies = [Strategy(b, p, r, c) for p in preloadings for b in policies for r in balances for c in caches]
    environment = _environment(
        bench,
        chain,
        {"inputs": len(items), "concurrency": None if arrival_rate else concurrency, "arrival_rate": arrival_rate,
         "warmup": warmup, "repeats": repeats, "seed": seed},
    )
    runs: list[pd.DataFrame] = []
    calls: list[pd.DataFrame] = []
    passes: list[dict[str, Any]] = []
    from tqdm.auto import tqdm

    total = repeats * len(strategies)
    _load_once(bench, chain, strategies)
    with _restored(bench, chain), tqdm(
        total=total, desc=f"compare {chain.name}", unit="pass", disable=not progress
    ) as bar:
        try:
            for repeat in range(repeats):
                shift = repeat % len(strategies)
                for strategy in strategies[shift:] + strategies[:shift]:
                    bar.set_postfix_str(_label(*strategy.labels), refresh=False)
                    started_ns, result, weights, cuda, prefix_kv = _one_pass(bench, chain, strategy, workload)
                    pass_runs, pass_calls, figures = _measure(bench, chain, result, started_ns)
                    labels = dict(zip(AXES, strategy.labels), repeat=repeat)
                    runs.append(pass_runs.assign(**labels))
                    calls.append(pass_calls.assign(**labels))
                    passes.append({**labels, **figures, "peak_weights_mb": weights / 2**20,
                                   "peak_cuda_mb": cuda / 2**20, "prefix_kv_mb": prefix_kv / 2**20})
                    bar.update()
                    if on_pass is not None:
                        on_pass(_assemble(chain.name, strategies, runs, calls, passes, environment))
        except KeyboardInterrupt:
            kept = _assemble(chain.name, strategies, runs, calls, passes, environment) if passes else None
            raise CompareInterrupted(chain.name, kept, total) from None
    return _assemble(chain.name, strategies, runs, calls, passes, environment)


class CompareInterrupted(KeyboardInterrupt):
    """:func:`compare` was interrupted (Ctrl-C, the notebook's stop button); ``comparison`` holds the passes it finished.

    It is a KeyboardInterrupt, so it stops a script or a cell as one would. ``comparison`` is None if no pass
    finished; the pass under way is left out, as a pass of only some inputs would skew its strategy's figures.
    """

    def __init__(self, chain: str, comparison: Comparison | None, total: int) -> None:
        self.comparison = comparison
        done = len(comparison.passes()) if comparison is not None else 0
        super().__init__(
            f"wb.compare on chain {chain!r} interrupted after {done} of {total} passes"
            + ("; the finished passes are kept on this error's .comparison (each strategy's table row says how many "
               "repeats it had)" if done else "")
        )


def _load_once(bench: Workbench, chain: Chain, strategies: Sequence[Strategy]) -> None:
    """Before cold starts are measured, load the chain's models once if one is not loaded: the process's first load
    pays once for what every later one finds ready (imports, first-use setup: ~1.2 s against ~0.01 s after, for the
    tiny model here), and left to the first pass it went to whichever strategy came first."""
    if all(s.preloading is None for s in strategies):
        return
    for name in chain.spec.models():
        if bench.registry.is_loaded(name):
            continue
        try:
            bench.load(name)  # as registered
        except WorkbenchError:  # the passes meet it, and count it
            log.debug("loading model %r before the comparison failed", name, exc_info=True)


def _check_models_take(
    bench: Workbench,
    chain: Chain,
    preloadings: list[PreloadingStrategy | None],
    policies: list[BatchingPolicy | None],
    balances: list[BalancePolicy | None],
) -> None:
    """Refuse, before the first pass, a strategy one of the chain's models cannot run: found at its own first pass,
    it would lose the passes measured before it (or fail every run of its passes, a model over a keep-warm budget)."""
    models = chain.spec.models()
    for name in models:
        for policy in policies:
            if policy is not None:
                bench.engine.check_policy(name, policy)
        for balance in balances:
            if balance is not None:
                bench.engine.check_balance(name, balance)
        for strategy in preloadings:
            if isinstance(strategy, KeepWarm):
                bench.engine.preloader.check_budget(name, strategy.budget)
    if any(b is not None for b in balances) and all(bench.engine.replica_count(name) < 2 for name in models):
        who = (f"{models[0]!r} runs one replica" if len(models) == 1 else
               f"each of {', '.join(map(repr, models))} runs one replica" if models else "it calls no model")
        raise StrategyError(
            f"chain {chain.name!r}: {who}, so every balance policy sends every call to it and the comparison would "
            "rank policies that did the same",
            hint="load a model of the chain with replicas to compare how policies spread its calls, e.g. "
            "bench.load(NAME, PATH, replicas=2)",
        )


def _assemble(
    chain: str,
    strategies: Sequence[Strategy],
    runs: list[pd.DataFrame],
    calls: list[pd.DataFrame],
    passes: list[dict[str, Any]],
    environment: Mapping[str, Any],
) -> Comparison:
    """A Comparison of the passes measured so far."""
    import pandas as pd

    order = [*AXES, "repeat"]
    return Comparison(
        chain,
        [s.labels for s in strategies],
        _front(pd.concat(runs, ignore_index=True), order),
        _front(pd.concat(calls, ignore_index=True), order),
        _front(pd.DataFrame(passes), order),
        environment,
    )


def _front(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``frame`` with ``columns`` moved to the front."""
    return frame[columns + [c for c in frame.columns if c not in columns]]


def _one_pass(
    bench: Workbench, chain: Chain, strategy: Strategy, workload: Workload
) -> tuple[int, WorkloadResult, int, float, int]:
    """Put ``strategy`` in place and run one workload pass; returns its start, result, memory peaks and the prefix KV
    its hops built (none for a pass without prefix-cached hops: what another pass, or the user, left is not its own)."""
    models = chain.spec.models()
    if strategy.preloading is not None:
        for name in models:
            if bench.registry.is_loaded(name):
                bench.unload(name)
        bench.set_preloading(strategy.preloading)
    if strategy.batching is not None:
        for name in models:
            bench.set_batching(name, strategy.batching)
    if strategy.balance is not None:
        for name in models:
            bench.set_balance(name, strategy.balance)
    with ExitStack() as stack:
        if strategy.cache is not None:
            chain = _with_cache(chain, strategy.cache)
        scratch = None
        if any(hop.cache.exact or hop.cache.prefix for hop in chain.spec.hops):
            # Each pass starts cold, so its hits are its own inputs' repeats: prefixes are prefilled again, and
            # answers go to a scratch cache (the user's stored answers stay, and are not read). So also without
            # cache arms: else every pass after the first is answered from the first's answers.
            for name in models:
                if bench.registry.is_loaded(name):
                    bench.engine.clear_prefix_caches(name)
            scratch = stack.enter_context(_scratch_cache(bench))
        with _MemoryWatch(bench) as memory:
            started_ns = now_ns()
            if strategy.preloading is not None:
                try:
                    bench.prepare(chain)
                except ModelLoadError:  # as under lazy: each run loads on use, fails, and is counted with its error
                    log.debug("preparing chain %r for a pass failed", chain.name, exc_info=True)
            # The warm-up runs are the first inputs again: their answers, left in the scratch cache, would answer the
            # measured runs of those inputs (a prefix, shared by every input, stays prefilled: that is warm state).
            result = workload.run(chain, after_warmup=scratch.clear if scratch is not None else None)
        prefix_kv = _prefix_kv_bytes(bench, models) if any(hop.cache.prefix for hop in chain.spec.hops) else 0
    return started_ns, result, memory.weights_peak, memory.cuda_peak, prefix_kv


@contextmanager
def _scratch_cache(bench: Workbench) -> Iterator[ResponseCache]:
    """The workbench's exact response cache swapped for an empty one in a temporary directory, for the block."""
    from workbench.chains.cache import CACHE_FILE, ResponseCache

    with tempfile.TemporaryDirectory(prefix="autoglm-compare-cache-") as folder:
        scratch = ResponseCache(Path(folder) / CACHE_FILE)
        previous = bench.use_cache(scratch)
        try:
            yield scratch
        finally:
            bench.use_cache(previous)
            scratch.close()


def _with_cache(chain: Chain, arm: str) -> Chain:
    """``chain`` with its LLM hops' ``cache:`` replaced by ``arm``, where a hop can take it."""
    from workbench.chains.chain import Chain
    from workbench.chains.spec import HopCache, fixed_prefix

    hops = []
    for hop in chain.spec.hops:
        if hop.kind == "llm":
            exact = "exact" in arm and hop.params.greedy
            prefix = "prefix" in arm and hop.template is not None and bool(fixed_prefix(hop.template).strip())
            hop = dataclasses.replace(hop, cache=HopCache(exact=exact, prefix=prefix))
        hops.append(hop)
    return Chain(dataclasses.replace(chain.spec, hops=hops), chain.bench)


@contextmanager
def _restored(bench: Workbench, chain: Chain) -> Iterator[None]:
    """Put the preloading strategy and the chain's models' batching and balance policies back, however the block ends.

    Models outside the chain stay as they were: a keep-warm pass (or a keep-warm strategy put back) evicts only the
    chain's own models to keep within its budget."""
    preloading = bench.preloading
    policies = {name: bench.engine.policy(name) for name in chain.spec.models()}
    balances = {name: bench.engine.balance(name) for name in chain.spec.models()}
    with bench.engine.preloader.confined_to(chain.spec.models()):
        try:
            yield
        finally:
            bench.set_preloading(preloading)
            for name, policy in policies.items():
                bench.set_batching(name, policy)  # kept for its next load if a pass left the model unloaded
            for name, balance in balances.items():
                bench.set_balance(name, balance)
