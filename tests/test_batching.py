"""Batching policies on the real tiny model: same greedy outputs, limits kept, spans linked, live swaps."""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import eventually
from opentelemetry.sdk.trace import ReadableSpan

import workbench as wb
from workbench.engine import GenerationParams, GenerationRequest, GenerationResult
from workbench.tracing import attributes as attr

# Prompts of very different lengths (a few tokens to a few dozen), so padded batches pad.
PROMPTS = [
    "A chain",
    "Question: What is the capital of France?\nPlan:",
    "Latency is measured per span: queue wait, prefill, decode, and the time to first token. Question: How many?",
    "Tokens in, tokens out",
    "Plan: count the hops in the spec. Answer:",
    "The model is small, the tokenizer is trained on this text, and everything runs offline. Researchers compare "
    "batching policies and preloading strategies to find the fastest chain. Answer:",
    "Question: How many hops does this chain have?",
    "Paris",
    "Each hop reads the question and the answers of earlier hops, then writes",
    "Researchers compare batching policies",
    "Answer: Paris is the capital of France. Question:",
    "Tokens in, tokens out, padding, batch size, throughput in tokens per second.",
]
GREEDY = GenerationParams(max_new_tokens=12)

# Long waits: the batches close when full, so these only make batching certain on a busy machine.
POLICIES = [
    wb.StaticBatching(size=4, timeout_ms=2_000),
    wb.DynamicBatching(max_batch=5, max_wait_ms=300),
    wb.DynamicBatching(max_batch=12, max_wait_ms=300, max_batch_tokens=120),
    wb.DynamicBatching(max_batch=12, max_wait_ms=300, max_length_ratio=1.5),
    wb.ContinuousBatching(max_batch=6),
]


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> Iterator[wb.Workbench]:
    """One workbench with 'tiny' on the CPU; each test sets the policy it needs."""
    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu")
        yield bench


@pytest.fixture(scope="module")
def reference(tiny: wb.Workbench) -> dict[tuple[str, int], GenerationResult]:
    """NoBatching's greedy results, by prompt and max_new_tokens."""
    tiny.set_batching("tiny", wb.NoBatching())
    return {
        (p, n): tiny.engine.generate("tiny", p, GenerationParams(max_new_tokens=n)) for p in PROMPTS for n in (3, 12)
    }


def _submit_all(bench: wb.Workbench, prompts: list[str], params: list[GenerationParams]) -> list[GenerationResult]:
    """Queue every request before waiting for any, as concurrent callers would."""
    requests: list[GenerationRequest] = [bench.engine.submit("tiny", p, q) for p, q in zip(prompts, params)]
    return [r.future.result(timeout=120) for r in requests]


def _spans(bench: wb.Workbench, name: str, policy: wb.BatchingPolicy) -> list[ReadableSpan]:
    return [
        s for s in bench.traces().spans
        if s.name == name and (s.attributes or {}).get(attr.BATCH_POLICY) == policy.name
    ]


def _shared_work(bench: wb.Workbench, policy: wb.BatchingPolicy, results: list[GenerationResult]) -> bool:
    """Whether some of ``results`` ran together: in one padded batch, or in the continuous scheduler at once."""
    if not policy.continuous:
        return max(r.batch_size for r in results) > 1
    ids = {r.batch_id for r in results}
    batches = [s for s in _spans(bench, "batch tiny", policy) if s.attributes[attr.BATCH_ID] in ids]
    return max(s.attributes["workbench.batch.inflight"] for s in batches) > 1


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_every_policy_gives_the_greedy_outputs_of_no_batching(
    tiny: wb.Workbench, reference: dict[tuple[str, int], GenerationResult], policy: wb.BatchingPolicy
) -> None:
    tiny.set_batching("tiny", policy)
    results = _submit_all(tiny, PROMPTS, [GREEDY] * len(PROMPTS))
    for prompt, result in zip(PROMPTS, results):
        expected = reference[(prompt, GREEDY.max_new_tokens)]
        assert result.token_ids == expected.token_ids, prompt
        assert result.text == expected.text
        assert result.finish_reason == expected.finish_reason
    assert _shared_work(tiny, policy, results), "the requests were queued together, so some must run together"


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_spans_record_batching_and_each_batch_links_the_requests_it_served(
    tiny: wb.Workbench, policy: wb.BatchingPolicy
) -> None:
    tiny.set_batching("tiny", policy)
    results = _submit_all(tiny, PROMPTS, [GREEDY] * len(PROMPTS))
    served = {r.batch_id for r in results}
    requests = [s for s in _spans(tiny, "text_completion tiny", policy) if s.attributes[attr.BATCH_ID] in served]
    batches = {s.attributes[attr.BATCH_ID]: s for s in _spans(tiny, "batch tiny", policy)}
    assert len(requests) == len(PROMPTS)
    by_batch: dict[int, set[int]] = defaultdict(set)
    for span in requests:
        a = span.attributes
        assert a[attr.QUEUE_MS] >= 0
        assert a[attr.PADDING_TOKENS] >= 0
        assert 1 <= a[attr.BATCH_SIZE]
        by_batch[a[attr.BATCH_ID]].add(span.context.span_id)
    assert set(by_batch) <= set(batches)
    for batch_id, request_ids in by_batch.items():
        batch = batches[batch_id]
        assert {link.context.span_id for link in batch.links} == request_ids
        assert batch.attributes[attr.BATCH_SIZE] == len(request_ids)
        sizes = {s.attributes[attr.BATCH_SIZE] for s in requests if s.attributes[attr.BATCH_ID] == batch_id}
        assert sizes == {len(request_ids)}
    if not policy.continuous:  # padding adds up: the batch's is the sum of its rows'
        for batch_id, batch in batches.items():
            rows = [s for s in requests if s.attributes[attr.BATCH_ID] == batch_id]
            if rows:
                assert batch.attributes[attr.PADDING_TOKENS] == sum(s.attributes[attr.PADDING_TOKENS] for s in rows)


def test_batch_sizes_and_padded_tokens_stay_within_the_limits(tiny: wb.Workbench) -> None:
    checks: list[tuple[wb.BatchingPolicy, int, int | None]] = [
        (wb.StaticBatching(size=3, timeout_ms=2_000), 3, None),
        (wb.DynamicBatching(max_batch=5, max_wait_ms=300), 5, None),
        (wb.DynamicBatching(max_batch=12, max_wait_ms=300, max_batch_tokens=90), 12, 90),
    ]
    longest = 0
    for policy, max_size, max_tokens in checks:
        tiny.set_batching("tiny", policy)
        results = _submit_all(tiny, PROMPTS * 2, [GREEDY] * len(PROMPTS) * 2)
        longest = max(longest, *(r.tokens_in for r in results))
        served = {r.batch_id for r in results}
        batches = [s for s in _spans(tiny, "batch tiny", policy) if s.attributes[attr.BATCH_ID] in served]
        sizes = [b.attributes[attr.BATCH_SIZE] for b in batches]
        assert sum(sizes) == len(results)
        assert max(sizes) <= max_size
        assert max(sizes) > 1
        if max_tokens is not None:
            for batch in batches:
                size, width = batch.attributes[attr.BATCH_SIZE], batch.attributes["workbench.batch.padded_len"]
                # the oldest request always runs, alone if it is over the budget by itself
                assert size * width <= max_tokens or size == 1
    assert longest > 40, "some prompt must be long enough for the token budget to split batches"


def test_length_grouping_cuts_padding(tiny: wb.Workbench) -> None:
    padding = {}
    mixed, grouped = (wb.DynamicBatching(max_batch=12, max_wait_ms=300, max_length_ratio=r) for r in (None, 1.5))
    for policy in (mixed, grouped):
        tiny.set_batching("tiny", policy)
        results = _submit_all(tiny, PROMPTS, [GREEDY] * len(PROMPTS))
        padding[policy.max_length_ratio] = sum(r.padding_tokens for r in results)
        if policy.max_length_ratio is not None:
            by_batch: dict[int, list[int]] = defaultdict(list)
            for r in results:
                by_batch[r.batch_id].append(r.tokens_in)
            assert all(max(lengths) <= 1.5 * min(lengths) for lengths in by_batch.values())
    assert padding[1.5] < padding[None]


@pytest.mark.parametrize(
    "policy",
    [
        wb.StaticBatching(size=4, timeout_ms=2_000),
        wb.DynamicBatching(max_batch=12, max_wait_ms=300),
        wb.ContinuousBatching(max_batch=12),
    ],
    ids=lambda p: p.name,
)
def test_requests_with_different_parameters_never_run_with_each_other(
    tiny: wb.Workbench, reference: dict[tuple[str, int], GenerationResult], policy: wb.BatchingPolicy
) -> None:
    tiny.set_batching("tiny", policy)
    limits = [3 if i % 2 else 12 for i in range(len(PROMPTS))]
    results = _submit_all(tiny, PROMPTS, [GenerationParams(max_new_tokens=n) for n in limits])
    for prompt, limit, result in zip(PROMPTS, limits, results):
        assert result.tokens_out <= limit
        assert result.token_ids == reference[(prompt, limit)].token_ids
    limits_by_batch: dict[int, set[int]] = defaultdict(set)
    for limit, result in zip(limits, results):
        limits_by_batch[result.batch_id].add(limit)
    if not policy.continuous:  # the scheduler limits max_new_tokens per request, so it may mix them
        assert all(len(group) == 1 for group in limits_by_batch.values())
    assert _shared_work(tiny, policy, results)


def test_continuous_batching_runs_different_sampling_settings_one_after_the_other(tiny: wb.Workbench) -> None:
    tiny.set_batching("tiny", wb.ContinuousBatching(max_batch=8))
    greedy, sampled = GenerationParams(max_new_tokens=8), GenerationParams(max_new_tokens=8, temperature=0.8, seed=1)
    params = [greedy if i % 2 else sampled for i in range(8)]
    results = _submit_all(tiny, PROMPTS[:8], params)
    groups: dict[int, set[GenerationParams]] = defaultdict(set)
    for p, r in zip(params, results):
        groups[r.batch_id].add(p)
        assert 1 <= r.tokens_out <= 8
    assert all(len(g) == 1 for g in groups.values())


def test_a_hand_off_that_restarts_the_scheduler_counts_only_the_requests_in_it_after(tiny: wb.Workbench) -> None:
    # workbench.batch.inflight was counted before the scheduler restarted for the new settings, so it counted the
    # requests the restart waited for: a greedy request queued behind a long sampled one said inflight 2, though the
    # sampled one had finished before it was admitted, and read as concurrency that never was.
    tiny.set_batching("tiny", wb.ContinuousBatching(max_batch=8))
    long = tiny.engine.submit("tiny", "Hello", GenerationParams(max_new_tokens=400, temperature=5.0, seed=0))
    short = tiny.engine.submit("tiny", PROMPTS[1], GREEDY)
    results = [long.future.result(timeout=120), short.future.result(timeout=120)]
    assert results[0].tokens_out == 400  # seeded so that it runs to 400 tokens
    batches = {s.attributes[attr.BATCH_ID]: s for s in _spans(tiny, "batch tiny", tiny.engine.policy("tiny"))}
    assert [batches[r.batch_id].attributes["workbench.batch.inflight"] for r in results] == [1, 1]


def test_a_stream_under_continuous_batching_yields_its_tokens_as_they_come(tiny: wb.Workbench) -> None:
    # The scheduler was asked for each request's last output only, so chain.stream under ContinuousBatching yielded
    # no token at all: hop_started, then hop_finished with the whole answer.
    tiny.set_batching("tiny", wb.ContinuousBatching(max_batch=8))
    chain = tiny.chain({"name": "streamed", "hops": [
        {"name": "say", "model": "tiny", "prompt": "{{ q }}", "max_new_tokens": 20}]})
    events = list(chain.stream(q=PROMPTS[1]))
    tokens = [e for e in events if e.kind == "token"]
    assert len(tokens) > 1 and "".join(t.text for t in tokens).strip() == events[-1].run.output
    assert [e.kind for e in events].index("token") < [e.kind for e in events].index("hop_finished")

def test_a_request_that_times_out_under_continuous_batching_leaves_the_scheduler(tiny: wb.Workbench) -> None:
    # Its row ran on to max_new_tokens for nobody (400 steps here), holding a slot and KV blocks, and a policy swap
    # waited for it (1.1 s before the next request here, 0.1 s now).
    tiny.set_batching("tiny", wb.ContinuousBatching(max_batch=4))
    params = GenerationParams(max_new_tokens=400, temperature=5.0, seed=0)  # seeded so that it runs to 400 tokens
    with pytest.raises(wb.HopTimeout):
        tiny.engine.call("tiny", "Hello", params, timeout_s=0.2)
    cancelled = next(s for s in reversed(tiny.traces().spans) if (s.attributes or {}).get(attr.CANCELLED) == "running")

    def batch_ended() -> list[ReadableSpan]:
        return [s for s in tiny.traces().spans if s.name == "batch tiny"
                and any(link.context.span_id == cancelled.context.span_id for link in s.links)]

    # The timeout may come while the worker still starts the scheduler (slow on a busy machine): the row is admitted
    # and stopped at its first step then, so its batch ends a moment after HopTimeout, not before it.
    eventually(lambda: len(batch_ended()) == 1, "the cancelled request's batch to end")
    tiny.set_batching("tiny", wb.NoBatching())
    assert tiny.generate("tiny", "Hello", max_new_tokens=2).tokens_out == 2

@pytest.mark.parametrize("policy", [wb.DynamicBatching(max_batch=8, max_wait_ms=300), wb.StaticBatching(size=3)],
                         ids=["dynamic", "static"])
def test_a_seeded_request_samples_the_same_text_in_any_batch_as_alone(tiny: wb.Workbench,
                                                                       policy: wb.BatchingPolicy) -> None:
    # Every row of a batch drew from the one stream torch.manual_seed(seed) seeded, so a seeded request's text
    # depended on its batch-mates and its row (these prompts sampled otherwise in a batch than alone), and a
    # comparison of policies measured different answers (of different lengths) under each.
    params = GenerationParams(max_new_tokens=24, temperature=1.2, top_k=40, top_p=0.95, seed=7)
    tiny.set_batching("tiny", wb.NoBatching())
    alone = [r.token_ids for r in _submit_all(tiny, PROMPTS[:6], [params] * 6)]
    assert len(set(map(tuple, alone))) > 1  # it really samples, each prompt its own way
    tiny.set_batching("tiny", policy)
    batched = _submit_all(tiny, PROMPTS[:6], [params] * 6)
    assert min(r.batch_size for r in batched) >= 3  # every one batched (static:3 takes three at a time)
    assert [r.token_ids for r in batched] == alone
    twice = _submit_all(tiny, [PROMPTS[1]] * 3, [params] * 3)  # one prompt in three rows: three equal answers
    assert [r.token_ids for r in twice] == [alone[1]] * 3

def test_a_seeded_request_under_continuous_batching_samples_the_same_text_each_time(tiny: wb.Workbench) -> None:
    # transformers' scheduler seeds one generator when it starts and every row draws from it: the same seeded request
    # sampled another text the second time (the stream had moved on), and another again beside other requests.
    params = GenerationParams(max_new_tokens=16, temperature=1.5, seed=7)
    tiny.set_batching("tiny", wb.NoBatching())
    alone = [r.token_ids for r in _submit_all(tiny, PROMPTS[:3], [params] * 3)]
    tiny.set_batching("tiny", wb.ContinuousBatching(max_batch=8))
    first = [r.token_ids for r in _submit_all(tiny, PROMPTS[:3], [params] * 3)]
    assert len(set(map(tuple, first))) > 1  # it really samples, each prompt its own way
    assert first == alone  # as the padded generate samples it alone (and so in any batch, test above)
    again = _submit_all(tiny, PROMPTS[:3], [params] * 3)
    assert [r.token_ids for r in again] == first
    among = _submit_all(tiny, [PROMPTS[1], PROMPTS[1], PROMPTS[4]], [params, params, GREEDY])
    assert [r.token_ids for r in among[:2]] == [first[1]] * 2
    modes = {(s.attributes or {}).get(attr.BATCH_MODE) for s in _spans(tiny, "batch tiny", tiny.engine.policy("tiny"))}
    assert modes == {"continuous:seeded", "continuous"}  # the greedy one batched as before


def test_a_policy_swap_takes_over_a_worker_waiting_inside_the_old_policy(tiny: wb.Workbench) -> None:
    model = tiny.registry.get("tiny").model
    tiny.set_batching("tiny", wb.StaticBatching(size=64, timeout_ms=600_000))
    request = tiny.engine.submit("tiny", "A chain", GREEDY)
    assert not request.future.done()
    tiny.set_batching("tiny", wb.NoBatching())
    result = request.future.result(timeout=60)  # the old policy would hold it for ten minutes
    assert result.batch_size == 1
    assert request.span.attributes[attr.BATCH_POLICY] == "none"
    assert tiny.registry.get("tiny").model is model, "the swap must not reload the model"
    assert isinstance(tiny.engine.policy("tiny"), wb.NoBatching)


def test_switching_between_continuous_and_padded_batching_keeps_outputs(
    tiny: wb.Workbench, reference: dict[tuple[str, int], GenerationResult]
) -> None:
    model = tiny.registry.get("tiny").model
    attention = model.config._attn_implementation
    continuous, padded = wb.ContinuousBatching(max_batch=4), wb.DynamicBatching(max_batch=4, max_wait_ms=300)
    for policy in (continuous, padded, continuous):
        tiny.set_batching("tiny", policy)
        results = _submit_all(tiny, PROMPTS[:6], [GREEDY] * 6)
        assert [r.token_ids for r in results] == [reference[(p, 12)].token_ids for p in PROMPTS[:6]]
    tiny.set_batching("tiny", wb.NoBatching())
    assert tiny.engine.generate("tiny", PROMPTS[0], GREEDY).token_ids == reference[(PROMPTS[0], 12)].token_ids
    assert model.config._attn_implementation == attention


def test_a_full_batch_does_not_wait_out_the_window_of_a_cancelled_request_before_it(tiny: wb.Workbench) -> None:
    # The policy waited for company for the oldest request as it found it, even once that request's timeout had taken
    # it out of the queue: two requests with other parameters, a full batch of static:2, waited the whole ten minutes
    # of the cancelled request's window (20 s with a 20 s window).
    tiny.set_batching("tiny", wb.StaticBatching(size=2, timeout_ms=600_000))
    with pytest.raises(wb.HopTimeout):
        tiny.engine.call("tiny", "A chain", GenerationParams(max_new_tokens=3), timeout_s=0.2)
    results = _submit_all(tiny, PROMPTS[:2], [GREEDY] * 2)  # _submit_all waits 120 s, not 600
    assert [r.batch_size for r in results] == [2, 2]
    assert results[0].batch_id == results[1].batch_id


def test_static_batching_flushes_a_partial_batch_after_its_timeout(tiny: wb.Workbench) -> None:
    tiny.set_batching("tiny", wb.StaticBatching(size=8, timeout_ms=50))
    result = tiny.engine.generate("tiny", "A chain", GREEDY)
    assert result.batch_size == 1
    assert result.tokens_out >= 1


def test_unloading_a_continuous_model_finishes_what_it_admitted(tiny_path: Path) -> None:
    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu", batching=wb.ContinuousBatching(max_batch=4))
        requests = [bench.engine.submit("tiny", p, GREEDY) for p in PROMPTS[:4]]
        requests[0].future.result(timeout=60)
        bench.unload("tiny")
        for request in requests:
            assert request.future.done()


def test_chains_run_under_dynamic_batching_share_batches(tiny_path: Path) -> None:
    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu", batching=wb.DynamicBatching(max_batch=8, max_wait_ms=300))
        chain = bench.chain(
            {
                "name": "qa",
                "hops": [
                    {"name": "plan", "model": "tiny", "prompt": "Question: {{ q }}\nPlan:", "max_new_tokens": 6},
                    {"name": "answer", "model": "tiny", "prompt": "{{ plan }}\nAnswer:", "max_new_tokens": 6},
                ],
                "output": "answer",
            }
        )
        runs = chain.map([{"q": p} for p in PROMPTS[:8]], concurrency=8)
        assert all(r.error is None for r in runs)
        sizes = [s.attributes[attr.BATCH_SIZE] for s in bench.traces().spans if s.name == "batch tiny"]
        assert sum(sizes) == 16 and max(sizes) > 1


def test_each_policy_shows_its_settings() -> None:
    assert repr(wb.NoBatching()) == "NoBatching()"
    assert wb.NoBatching().name == "none"
    assert repr(wb.StaticBatching(size=8, timeout_ms=50)) == "StaticBatching(size=8, timeout_ms=50)"
    assert wb.StaticBatching(size=8, timeout_ms=50).name == "static:8:50ms"
    dynamic = wb.DynamicBatching(max_batch=16, max_wait_ms=5, max_batch_tokens=4096, max_length_ratio=1.5)
    assert repr(dynamic) == "DynamicBatching(max_batch=16, max_wait_ms=5, max_batch_tokens=4096, max_length_ratio=1.5)"
    assert wb.DynamicBatching(max_batch=16, max_wait_ms=5).name == "dynamic:16:5ms"
    assert dynamic.name == "dynamic:16:5ms:4096tok:len1.5"
    assert "max_batch=32" in repr(wb.ContinuousBatching(max_batch=32))
    assert wb.ContinuousBatching(max_batch=32).name == "continuous:32"


@pytest.mark.parametrize(
    "make",
    [
        lambda: wb.StaticBatching(size=0),
        lambda: wb.DynamicBatching(max_wait_ms=-1),
        lambda: wb.DynamicBatching(max_length_ratio=0.5),
        lambda: wb.ContinuousBatching(max_batch=0),
        # Sizes are whole numbers: a fractional or endless one crashed transformers' scheduler (its requests never
        # answered), a bool passed as 1, and text raised a bare TypeError.
        lambda: wb.StaticBatching(size=2.5),
        lambda: wb.StaticBatching(size="8"),  # type: ignore[arg-type]
        lambda: wb.StaticBatching(timeout_ms="5"),  # type: ignore[arg-type]
        lambda: wb.DynamicBatching(max_batch=True),
        lambda: wb.DynamicBatching(max_batch=math.inf),  # type: ignore[arg-type]
        lambda: wb.DynamicBatching(max_batch="16"),  # type: ignore[arg-type]
        lambda: wb.DynamicBatching(max_batch_tokens=512.5),  # type: ignore[arg-type]
        lambda: wb.DynamicBatching(max_length_ratio="1.5"),  # type: ignore[arg-type]
        lambda: wb.ContinuousBatching(max_batch=2.5),  # type: ignore[arg-type]
        lambda: wb.ContinuousBatching(page_size=4.5),  # type: ignore[arg-type]
    ],
)
def test_impossible_settings_are_refused_with_a_workbench_error(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(wb.StrategyError, match="must be") as info:
        make()
    kind = str(info.value.message).partition("(")[0]  # the hint names the policy's own class, not another's
    assert info.value.hint == f"help(wb.{kind}) lists its settings"


def test_continuous_batching_without_the_transformers_api_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake of an older transformers, whose manager takes no per-token timestamps: this one has them.
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    def add_request(self, input_ids, request_id=None, max_new_tokens=None):  # type: ignore[no-untyped-def]
        raise AssertionError("never called")

    assert "record_timestamps" in inspect.signature(ContinuousBatchingManager.add_request).parameters
    monkeypatch.setattr(ContinuousBatchingManager, "add_request", add_request)
    with pytest.raises(wb.WorkbenchError, match="transformers"):
        wb.ContinuousBatching()


def test_a_policy_may_be_named_and_anything_else_is_a_strategy_error(tiny: wb.Workbench, tiny_path: Path) -> None:
    tiny.set_batching("tiny", "static:4:20ms")
    assert tiny.engine.policy("tiny").name == wb.StaticBatching(4, 20).name
    assert tiny.generate("tiny", "Paris", max_new_tokens=2).text is not None
    for wrong in ("fast", 8, wb.NoBatching):
        with pytest.raises(wb.StrategyError, match="batching"):
            tiny.set_batching("tiny", wrong)  # type: ignore[arg-type]
    tiny.set_batching("tiny", wb.NoBatching())
    # The same at load and register: a bad name fails there, not as an AttributeError at the first request.
    with pytest.raises(wb.StrategyError):
        tiny.register("later", tiny_path, batching="dynamc:8")
    assert "later" not in tiny.registry.names()
    tiny.register("later", tiny_path, batching="dynamic:8:5ms", device="cpu")
    assert tiny.generate("later", "Paris", max_new_tokens=2).text is not None
    assert tiny.engine.policy("later").name == wb.DynamicBatching(8, 5).name
    tiny.unload("later", forget=True)
