"""Balance policies: which replica of a model serves the next request, chosen among the healthy ones by name."""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from workbench.errors import StrategyError, did_you_mean

BALANCE_FORMS = "round_robin, least_loaded, power_of_two, session_hash, weighted:W0,W1,... (one weight per replica)"


def _check_seed(policy: str, seed: object) -> None:
    """Raise StrategyError for a seed random.Random cannot take (a list or a dict failed with a bare TypeError)."""
    if seed is not None and not isinstance(seed, (int, float, str, bytes, bytearray)):
        raise StrategyError(f"{policy}: seed must be a whole number (or None: a new draw each time), not "
                            f"{type(seed).__name__} {seed!r:.60}",
                            hint=f"e.g. {policy}(seed=0) repeats the same draws from run to run")


class ReplicaLoad(Protocol):
    """What a policy reads of a replica: its place in the set, its name, and the requests it holds now."""

    index: int
    name: str
    in_flight: int


class BalancePolicy:
    """Picks one of the healthy replicas (never an empty list) for a request of ``session`` (None: no session).

    ``name`` is the short form :func:`parse_balance` reads back. A policy is called under its
    replica set's lock, so its own state (a counter, a random generator) needs no lock of its own.
    """

    @property
    def name(self) -> str:
        raise NotImplementedError

    def choose(self, healthy: Sequence[ReplicaLoad], session: str | None) -> ReplicaLoad:
        raise NotImplementedError

    def check(self, model: str, count: int) -> None:
        """Raise StrategyError if this policy cannot mean anything for ``model``'s ``count`` replicas."""

    def __str__(self) -> str:
        return self.name


class RoundRobin(BalancePolicy):
    """Each replica in turn; a sick one is passed over, and the turn goes on from the one chosen."""

    def __init__(self) -> None:
        self._last = -1

    @property
    def name(self) -> str:
        return "round_robin"

    def choose(self, healthy: Sequence[ReplicaLoad], session: str | None) -> ReplicaLoad:
        chosen = next((r for r in healthy if r.index > self._last), healthy[0])
        self._last = chosen.index
        return chosen

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RoundRobin)

    def __hash__(self) -> int:
        return hash(RoundRobin)


def _least(replicas: Sequence[ReplicaLoad], after: int = -1) -> ReplicaLoad:
    """The replica with the fewest requests in flight; among equals, the first in turn after index ``after``.

    Ties go round in turn rather than by how much each replica served so far: a slow replica has
    served less, and a tie-break on that would send it more just when its queue empties.
    """
    fewest = min(r.in_flight for r in replicas)
    tied = [r for r in replicas if r.in_flight == fewest]
    return next((r for r in tied if r.index > after), tied[0])


class LeastLoaded(BalancePolicy):
    """The replica with the fewest requests in flight (queued or running): a slow replica holds more, so gets fewer."""

    def __init__(self) -> None:
        self._last = -1

    @property
    def name(self) -> str:
        return "least_loaded"

    def choose(self, healthy: Sequence[ReplicaLoad], session: str | None) -> ReplicaLoad:
        chosen = _least(healthy, self._last)
        self._last = chosen.index
        return chosen

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LeastLoaded)

    def __hash__(self) -> int:
        return hash(LeastLoaded)


class PowerOfTwo(BalancePolicy):
    """Two replicas drawn at random (``seed`` makes the draws repeatable), and the less loaded of them.

    Close to least-loaded while reading only two counts, which matters once replicas are many or
    remote; with two replicas it is least-loaded, ties going either way at random.
    """

    def __init__(self, seed: int | None = None) -> None:
        _check_seed("PowerOfTwo", seed)
        self.seed = seed
        self._rng = random.Random(seed)

    @property
    def name(self) -> str:
        return "power_of_two" if self.seed is None else f"power_of_two:{self.seed}"

    def choose(self, healthy: Sequence[ReplicaLoad], session: str | None) -> ReplicaLoad:
        if len(healthy) == 1:
            return healthy[0]
        first, second = self._rng.sample(list(healthy), 2)  # drawn in random order, so a tie goes either way
        return second if second.in_flight < first.in_flight else first

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PowerOfTwo) and other.seed == self.seed

    def __hash__(self) -> int:
        return hash((PowerOfTwo, self.seed))


class SessionHash(BalancePolicy):
    """Every request of a session on the same replica (its cache stays warm); requests without a session: least loaded.

    Rendezvous hashing: a session goes to the healthy replica with the highest hash of (session,
    replica name), so a replica leaving moves only its own sessions, which come back when it returns.
    """

    def __init__(self) -> None:
        self._without = LeastLoaded()

    @property
    def name(self) -> str:
        return "session_hash"

    def choose(self, healthy: Sequence[ReplicaLoad], session: str | None) -> ReplicaLoad:
        if session is None:
            return self._without.choose(healthy, None)
        return max(healthy, key=lambda r: zlib.crc32(f"{session}\x00{r.name}".encode()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SessionHash)

    def __hash__(self) -> int:
        return hash(SessionHash)


class Weighted(BalancePolicy):
    """Replicas drawn in proportion to their weights: ``wb.Weighted([3, 1])`` or ``wb.Weighted({"m#0": 3, "m#1": 1})``.

    Weights are by replica index (a list, or a mapping of ints) or replica name; a replica not
    named weighs 0 and never serves unless every named one is sick. ``seed`` makes the draws repeatable.
    """

    def __init__(self, weights: Sequence[float] | Mapping[int | str, float], seed: int | None = 0) -> None:
        example = "e.g. wb.Weighted([3, 1]): three requests to replica 0 for one to replica 1"
        if isinstance(weights, Mapping):
            items = list(weights.items())
        elif isinstance(weights, Iterable) and not isinstance(weights, (str, bytes)):
            items = list(enumerate(weights))
        else:
            raise StrategyError(f"Weighted takes a list of weights (one per replica) or a mapping of replica index or "
                                f"name to weight, not {weights!r:.80}",
                                hint=f"{example}; as text, bench.set_balance(NAME, 'weighted:3,1')")
        for key, weight in items:
            if isinstance(key, bool) or not isinstance(key, (int, str)) or (isinstance(key, int) and key < 0):
                raise StrategyError(f"Weighted: {key!r:.80} is neither a replica index (0, 1, ...) nor a replica name",
                                    hint=f"{example}; or by name, wb.Weighted({{'m#0': 3, 'm#1': 1}})")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise StrategyError(f"Weighted: the weight of replica {key!r} must be a number >= 0, got {weight!r}",
                                    hint=example)
        # An infinite weight (or weights whose sum overflows) passed here and failed every request later, in the
        # random draw ("Total of weights must be finite").
        try:
            total = sum(float(weight) for _, weight in items)
        except OverflowError:  # an int too large for a float
            total = math.inf
        if not math.isfinite(total):
            raise StrategyError("Weighted: the weights must be finite, and so must their sum, got "
                                + ", ".join(f"{key!r}: {weight!r}" for key, weight in items),
                                hint=example)
        if not any(weight > 0 for _, weight in items):
            raise StrategyError("Weighted: at least one weight must be more than 0",
                                hint=example)
        self.weights: dict[int | str, float] = {key: float(weight) for key, weight in items}
        # Given as a list (or weighted:W0,W1 as text): one weight per replica, in order, so one too few is a mistake
        # (the replica left out would never serve), not a choice as leaving a replica out of a mapping is.
        self.positional = not isinstance(weights, Mapping)
        _check_seed("Weighted", seed)
        self.seed = seed
        self._rng = random.Random(seed)
        # Only replicas of weight 0 healthy: the least loaded of them, ties in turn (as LeastLoaded); always the first
        # of a tie, one sequential request after another all went to one of them while the others stood idle.
        self._without = LeastLoaded()

    def weight(self, replica: ReplicaLoad) -> float:
        return self.weights.get(replica.index, self.weights.get(replica.name, 0.0))

    def check(self, model: str, count: int) -> None:
        """Refuse weights that name a replica ``model`` does not have (``m#5`` of two), or that give none of its
        replicas a weight: every request would go to least-loaded instead, with nothing said. Names of other
        models' replicas are let be: one policy may weigh the replicas of every model of a chain (wb.compare)."""
        if count < 2:
            return  # one replica: nothing to weigh
        names = [f"{model}#{i}" for i in range(count)]
        have = f"{model!r} has {count} replicas: {', '.join(names)} (or indexes 0-{count - 1})"
        if self.positional and len(self.weights) < count:
            raise StrategyError(f"{self.name} gives {len(self.weights)} weight{'s' * (len(self.weights) != 1)} for the "
                                f"{count} replicas of {model!r}: one weight per replica, in order (a replica left out "
                                f"would never serve)", hint=f"e.g. weighted:{','.join(['1'] * count)}; weigh a "
                                "replica 0 to leave it out on purpose")
        prefix = f"{model}#"
        for key in self.weights:
            stray = (isinstance(key, int) and key >= count) or (
                isinstance(key, str) and key.startswith(prefix) and key not in names)
            if stray:
                raise StrategyError(f"{self!r} weighs replica {key!r}, but {have}",
                                    hint="weigh the replicas the model has, by index or by name")
        for index, name in enumerate(names):
            if index in self.weights and name in self.weights:  # the index's weight won, and the name's was dropped
                raise StrategyError(f"{self!r} weighs replica {name!r} twice: {self.weights[index]:g} as index "
                                    f"{index} and {self.weights[name]:g} as {name!r}",
                                    hint="weigh each replica once, by index or by name")
        if not any(self.weights.get(i, self.weights.get(n, 0.0)) > 0 for i, n in enumerate(names)):
            raise StrategyError(f"{self!r} gives none of the replicas of {model!r} a weight above 0; {have}",
                                hint=f"e.g. wb.Weighted({{{names[0]!r}: 3, {names[1]!r}: 1}})")

    @property
    def name(self) -> str:
        if all(isinstance(key, int) for key in self.weights) and sorted(self.weights) == list(range(len(self.weights))):
            return "weighted:" + ",".join(f"{self.weights[i]:g}" for i in range(len(self.weights)))
        return "weighted:" + ",".join(f"{key}={weight:g}" for key, weight in self.weights.items())

    def choose(self, healthy: Sequence[ReplicaLoad], session: str | None) -> ReplicaLoad:
        weights = [self.weight(r) for r in healthy]
        if not any(weights):  # only replicas of weight 0 are healthy: better served by them than not at all
            return self._without.choose(healthy, None)
        return self._rng.choices(list(healthy), weights)[0]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Weighted) and (other.weights, other.seed) == (self.weights, self.seed)

    def __hash__(self) -> int:
        return hash((Weighted, tuple(self.weights.items()), self.seed))

    def __repr__(self) -> str:
        return f"Weighted({self.weights!r}, seed={self.seed!r})"


def _weighted(setting: str) -> Weighted:
    weights: dict[int | str, float] = {}
    named = False
    for index, part in enumerate(p.strip() for p in setting.split(",")):
        key, sep, value = part.rpartition("=")
        named = named or bool(sep)
        try:
            weights[key if sep else index] = float(value)
        except ValueError:
            raise StrategyError(f"weight {value!r} is not a number", hint=f"the forms are {BALANCE_FORMS}") from None
    return Weighted(weights if named else list(weights.values()))


# The registry of policies by name: a factory per name, given the text after the colon ("" for none).
BALANCE_POLICIES: dict[str, Callable[[str], BalancePolicy]] = {
    "round_robin": lambda setting: RoundRobin(),
    "least_loaded": lambda setting: LeastLoaded(),
    "power_of_two": lambda setting: PowerOfTwo(int(setting) if setting else None),
    "session_hash": lambda setting: SessionHash(),
    "weighted": _weighted,
}
_TAKES_SETTING = {"power_of_two", "weighted"}


def _check_policy(policy: BalancePolicy) -> None:
    """Refuse a policy of the user's own that could never pick: one with no ``choose``, or no ``name`` (read for every
    request's span and ``bench.replicas()``; a NotImplementedError there failed every request, and hung an awaited one).
    """
    kind = type(policy).__name__
    example = ("a subclass of wb.BalancePolicy gives a name property (its short form, e.g. 'mine') and "
               "choose(healthy, session), which returns one of healthy")
    if type(policy).choose is BalancePolicy.choose:
        raise StrategyError(f"balance policy {kind} defines no choose(healthy, session), so it cannot pick a replica",
                            hint=f"{example}; or one of the forms {BALANCE_FORMS}")
    try:
        name: object = policy.name
    except Exception as exc:
        name = exc
    if not isinstance(name, str) or not name.strip():
        got = f"raised {type(name).__name__}" if isinstance(name, Exception) else f"is {name!r:.60}"
        raise StrategyError(f"balance policy {kind} has no name (its name {got}): every request's span and "
                            "bench.replicas() say the policy by its name", hint=example)


def parse_balance(text: str | BalancePolicy) -> BalancePolicy:
    """A policy from its short name, the inverse of ``policy.name``; a policy object passes through unchanged."""
    if isinstance(text, BalancePolicy):
        _check_policy(text)
        return text
    if not isinstance(text, str):
        raise StrategyError(f"a balance policy is a name or a policy object, not {type(text).__name__}",
                            hint=f"the forms are {BALANCE_FORMS}")
    kind, _, setting = text.strip().partition(":")
    kind = kind.strip().lower().replace("-", "_")
    if kind not in BALANCE_POLICIES:
        raise StrategyError(f"balance {text!r}: unknown policy {kind!r}{did_you_mean(kind, BALANCE_POLICIES)}",
                            hint=f"the forms are {BALANCE_FORMS}")
    if setting and kind not in _TAKES_SETTING:
        raise StrategyError(f"balance {text!r}: {kind} takes no setting", hint=f"the forms are {BALANCE_FORMS}")
    if kind == "weighted" and not setting:
        raise StrategyError(f"balance {text!r}: weighted needs a weight per replica, e.g. weighted:3,1",
                            hint=f"the forms are {BALANCE_FORMS}")
    try:
        return BALANCE_POLICIES[kind](setting.strip())
    except ValueError:
        raise StrategyError(f"balance {text!r}: {setting!r} is not a whole-number seed",
                            hint=f"the forms are {BALANCE_FORMS}") from None
    except StrategyError as exc:
        raise StrategyError(f"balance {text!r}: {exc.message}", hint=exc.hint) from None
