"""Named LoRA adapters on one base model: hops pick one, batches mix or group them, new versions swap in live."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import workbench as wb
from workbench.engine import GenerationParams
from workbench.models.adapters import GOLDEN_PROMPTS, content_digest
from workbench.tracing import attributes as attr

PROMPT = "Question: What is the capital of France?\nAnswer:"
PROMPTS = [PROMPT, "A chain is a graph of hops.", "Plan: count the hops in the spec.", "Tokens in, tokens out"]
NEW = 10
DEADLINE_S = 60.0


def by_hand(base: Path, adapter: Path | None, prompt: str, new: int = NEW) -> list[int]:
    """Greedy tokens of ``prompt`` from the base model with ``adapter`` attached by peft directly (None: bare)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**encoded, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return output[0, encoded["input_ids"].shape[1]:].tolist()


def wait_for(condition: Callable[[], object], what: str, deadline_s: float = DEADLINE_S) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def publish(source: Path, watched: Path) -> None:
    """Make ``watched`` hold what ``source`` holds, each file replaced atomically (weights before the config)."""
    wanted = {p.name for p in source.iterdir() if p.is_file()}
    for file in sorted(source.iterdir(), key=lambda p: p.name == "adapter_config.json"):
        if file.is_file():
            shutil.copyfile(file, watched / f".{file.name}.tmp")
            os.replace(watched / f".{file.name}.tmp", watched / file.name)
    for stale in watched.iterdir():
        if stale.is_file() and stale.name not in wanted:
            stale.unlink()


@pytest.fixture(scope="module")
def lora(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real adapters for the tiny model, built once: two named ones, a second version of 'sql', and bad ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    built = {
        "sql": wb.tiny_lora(tiny_path, root / "sql", seed=1),
        "chat": wb.tiny_lora(tiny_path, root / "chat", seed=2),
        "sql_v2": wb.tiny_lora(tiny_path, root / "sql_v2", seed=3),
        "pickled": wb.tiny_lora(tiny_path, root / "pickled", seed=4, safe=False),
    }
    # An adapter built for another base model: the same module names, half the hidden size.
    other = root / "other-base"
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(other)
    built["mismatched"] = wb.tiny_lora(other, root / "mismatched", seed=5)
    corrupt = root / "corrupt"
    shutil.copytree(built["sql_v2"], corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # an interrupted copy
    built["corrupt"] = corrupt
    return built


@pytest.fixture(scope="module")
def adapted(tiny_path: Path, lora: dict[str, Path]) -> Iterator[wb.Workbench]:
    """A workbench with 'tiny' carrying the adapters 'sql' and 'chat', and 'plain' without any."""
    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu", adapters={"sql": lora["sql"], "chat": lora["chat"]},
                   batching=wb.DynamicBatching(max_batch=16, max_wait_ms=5))
        bench.load("plain", tiny_path, device="cpu")
        yield bench


def _request_rows(run: wb.Run) -> pd.DataFrame:
    return run.trace.table().query("name == 'text_completion tiny'")


def test_a_hop_with_an_adapter_differs_from_the_base_and_matches_peft_by_hand(
    adapted: wb.Workbench, tiny_path: Path, lora: dict[str, Path]
) -> None:
    chain = adapted.chain(f"""
name: two_ways
hops:
  - name: bare
    model: tiny
    prompt: "{{{{ question }}}}"
    max_new_tokens: {NEW}
  - name: tuned
    model: tiny
    adapter: sql
    prompt: "{{{{ question }}}}"
    max_new_tokens: {NEW}
output: tuned
""")
    run = chain.run(question=PROMPT)
    tokenizer = adapted.registry.get("tiny").tokenizer
    expected_tuned = by_hand(tiny_path, lora["sql"], PROMPT)
    expected_bare = by_hand(tiny_path, None, PROMPT)
    assert expected_tuned != expected_bare  # the adapter's B weights are not zero: it changes the answer
    assert run.outputs["tuned"] == tokenizer.decode(expected_tuned, skip_special_tokens=True).strip()
    assert run.outputs["bare"] == tokenizer.decode(expected_bare, skip_special_tokens=True).strip()
    rows = _request_rows(run).set_index("attributes.workbench.hop.name")
    assert rows.loc["tuned", "attributes.workbench.adapter.name"] == "sql"
    assert rows.loc["tuned", "attributes.workbench.adapter.version"] == 1
    assert rows.loc["tuned", "attributes.workbench.adapter.key"] == "sql@v1"
    assert pd.isna(rows.loc["bare", "attributes.workbench.adapter.name"])  # the base model names no adapter
    # Direct calls pick adapters too, and the other adapter says something else again.
    assert adapted.generate("tiny", PROMPT, adapter="sql", max_new_tokens=NEW).token_ids == expected_tuned
    assert adapted.generate("tiny", PROMPT, adapter="chat", max_new_tokens=NEW).token_ids not in (
        expected_tuned, expected_bare)


def _batched(bench: wb.Workbench, policy: wb.BatchingPolicy) -> dict[tuple[str, str | None], wb.GenerationResult]:
    """Every prompt for the base model and each adapter, queued together under ``policy``."""
    bench.set_batching("tiny", policy)
    params = GenerationParams(max_new_tokens=NEW)
    requests = {(prompt, adapter): bench.engine.submit("tiny", prompt, params, adapter=adapter)
                for prompt in PROMPTS for adapter in (None, "sql", "chat")}
    return {key: request.future.result(timeout=DEADLINE_S) for key, request in requests.items()}


def test_a_mixed_batch_answers_as_batches_grouped_by_adapter_do(adapted: wb.Workbench) -> None:
    # A long wait for company, so all twelve requests queued together share batches.
    mixed = _batched(adapted, wb.DynamicBatching(max_batch=16, max_wait_ms=2000))
    grouped = _batched(adapted, wb.DynamicBatching(max_batch=16, max_wait_ms=2000, adapters="grouped"))
    adapted.set_batching("tiny", wb.DynamicBatching(max_batch=16, max_wait_ms=5))
    assert {key: r.token_ids for key, r in mixed.items()} == {key: r.token_ids for key, r in grouped.items()}
    # Mixed: one batch held the base model and both adapters. Grouped: every batch held one adapter (or none).
    def adapters_per_batch(results: dict[tuple[str, str | None], wb.GenerationResult]) -> list[set[str | None]]:
        batches: dict[int, set[str | None]] = {}
        for (_, adapter), result in results.items():
            batches.setdefault(result.batch_id, set()).add(adapter)
        return list(batches.values())

    assert any(len(kinds) == 3 for kinds in adapters_per_batch(mixed))
    assert all(len(kinds) == 1 for kinds in adapters_per_batch(grouped))
    assert len(adapters_per_batch(grouped)) >= 3
    # The prompt's answer depends on the adapter it ran with, not on its batch-mates.
    assert mixed[(PROMPT, "sql")].token_ids != mixed[(PROMPT, None)].token_ids
    # The batch spans say which adapter versions each batch ran, and how adapters were batched.
    batches = adapted.traces().table().query("name == 'batch tiny'").set_index("attributes.workbench.batch.id")
    mixed_span = batches.loc[mixed[(PROMPT, "sql")].batch_id]
    assert mixed_span["attributes.workbench.batch.adapters"] == "mixed"
    assert set(mixed_span["attributes.workbench.adapter.names"]) == {"__base__", "chat@v1", "sql@v1"}
    grouped_span = batches.loc[grouped[(PROMPT, "sql")].batch_id]
    assert grouped_span["attributes.workbench.batch.adapters"] == "grouped"
    assert list(grouped_span["attributes.workbench.adapter.names"]) == ["sql@v1"]


def test_adapters_come_as_a_dict_pairs_or_a_front_ends_flag() -> None:
    from workbench.models.adapters import parse_adapters

    expected = (("sql", "/a/sql"), ("chat", "/a/chat"))
    assert parse_adapters({"sql": "/a/sql", "chat": Path("/a/chat")}) == expected
    assert parse_adapters("sql=/a/sql,chat=/a/chat") == expected
    assert parse_adapters(list(expected)) == expected
    with pytest.raises(wb.AdapterError, match="not a name a hop can use"):
        parse_adapters({"my-adapter": "/a"})
    with pytest.raises(wb.AdapterError, match="is not NAME=PATH"):
        parse_adapters("sql")


def test_grouped_batching_round_trips_through_its_short_name() -> None:
    policy = wb.DynamicBatching(max_batch=8, max_wait_ms=5, adapters="grouped")
    assert policy.name == "dynamic:8:5ms:grouped"
    from workbench.engine.batching import parse_policy

    assert parse_policy(policy.name) == policy
    assert parse_policy("static:4:20ms:grouped") == wb.StaticBatching(4, 20, adapters="grouped")
    with pytest.raises(wb.WorkbenchError, match="adapters must be 'mixed' or 'grouped'"):
        wb.DynamicBatching(adapters="sorted")


def test_an_unknown_adapter_in_a_spec_names_the_hop_the_field_and_the_line(adapted: wb.Workbench) -> None:
    with pytest.raises(wb.SpecError) as info:
        adapted.chain("name: typo\nhops:\n  - name: ask\n    model: tiny\n    adapter: sqll\n    prompt: \"{{ q }}\"\n")
    error = info.value
    assert (error.hop, error.field, error.line) == ("ask", "adapter", 5)
    assert "did you mean 'sql'?" in str(error)
    with pytest.raises(wb.SpecError, match="model 'plain' has no adapter 'sql'") as info:
        adapted.chain({"name": "bare", "hops": [{"name": "ask", "model": "plain", "adapter": "sql", "prompt": "x"}]})
    assert info.value.field == "adapter"


def test_an_adapter_a_model_does_not_serve_is_refused_with_its_name(adapted: wb.Workbench) -> None:
    with pytest.raises(wb.AdapterError, match="model 'plain' serves no named adapters"):
        adapted.generate("plain", PROMPT, adapter="sql")
    with pytest.raises(wb.AdapterError, match="no live adapter named 'sqll'") as info:
        adapted.generate("tiny", PROMPT, adapter="sqll")
    assert "did you mean 'sql'?" in str(info.value)


def test_adapters_load_in_this_process_only_and_from_safetensors_only(
    bench: wb.Workbench, tiny_path: Path, lora: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(wb.ModelLoadError, match="named adapters are served in this process only"):
        bench.load("iso", tiny_path, device="cpu", adapters={"sql": lora["sql"]}, isolation="process")
    with pytest.raises(wb.AdapterError, match="adapter 'no-such-adapter' does not exist.*relative paths start at"):
        bench.load("missing", tiny_path, device="cpu", adapters={"sql": "no-such-adapter"})
    with pytest.raises(wb.AdapterError, match="only pickled weights"):
        bench.load("pickled", tiny_path, device="cpu", adapters={"sql": lora["pickled"]})
    assert "pickled" not in bench.registry.names()
    # Said once, by the error: a warning too printed the reason a second time above it (%autoglm load --adapters).
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "refused" in r.getMessage()]


def test_an_adapter_refused_at_load_says_what_to_do_and_leaves_nothing_loaded(
    bench: wb.Workbench, tiny_path: Path, lora: dict[str, Path], tmp_path: Path
) -> None:
    # Weights that fit the base model under a config naming modules it lacks: peft itself refuses it.
    elsewhere = Path(shutil.copytree(lora["sql"], tmp_path / "elsewhere"))
    config = json.loads((elsewhere / "adapter_config.json").read_text())
    (elsewhere / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    refusals = {lora["mismatched"]: ("another hidden size", "load it on the model it was trained on"),
                lora["corrupt"]: ("not a readable safetensors file", "write the adapter again"),
                elsewhere: ("Target modules {'c_attn'} not found", "load it on the model it was trained on")}
    for path, (message, hint) in refusals.items():
        with pytest.raises(wb.AdapterError, match=f"adapter 'bad': .*{re.escape(message)}") as refused:
            bench.load("tiny", tiny_path, device="cpu", adapters={"sql": lora["sql"], "bad": path})
        assert hint in (refused.value.hint or "")  # the check's advice reaches the caller, not only its finding
    assert bench.models().empty
    bench.load("tiny", tiny_path, device="cpu", adapters={"sql": lora["sql"]})  # the name is free for a good load
    assert bench.adapters("tiny")["key"].tolist() == ["sql@v1"]


def test_an_adapter_on_gpt2s_conv1d_projections_loads_and_matches_peft_by_hand(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    base = tmp_path / "gpt2"  # GPT-2 keeps its projections in transformers' Conv1D, not nn.Linear
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # peft sets it for Conv1D, and says so
        adapter = wb.tiny_lora(base, tmp_path / "attn", seed=6, target_modules=("c_attn",))
    bench.load("gpt2", base, device="cpu", adapters={"attn": adapter})
    assert bench.adapters("gpt2").loc[0, "state"] == "live"
    expected = by_hand(base, adapter, PROMPT)
    assert expected != by_hand(base, None, PROMPT)
    assert bench.generate("gpt2", PROMPT, adapter="attn", max_new_tokens=NEW).token_ids == expected


def test_an_adapter_whose_rank_pattern_gives_a_module_its_own_rank_loads_and_is_held_to_max_rank(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 8})
    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), config)
    with torch.no_grad():  # B drawn, not peft's zeros, so the adapter changes the answer
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(8))
    tuned.save_pretrained(tmp_path / "patterned")
    bench.load("tiny", tiny_path, device="cpu", adapters={"patterned": tmp_path / "patterned"})
    row = bench.adapters("tiny").iloc[0]
    assert row["state"] == "live" and row["rank"] == 8
    expected = by_hand(tiny_path, tmp_path / "patterned", PROMPT)
    assert expected != by_hand(tiny_path, None, PROMPT)
    assert bench.generate("tiny", PROMPT, adapter="patterned", max_new_tokens=NEW).token_ids == expected
    with pytest.raises(wb.AdapterError, match=r"rank 8 \('v_proj' of its rank_pattern\); the rules allow 1 to 6"):
        bench.watch_adapter("tiny", "capped", tmp_path / "patterned", max_rank=6)


def test_target_modules_hold_an_adapters_whole_layers_and_embedding_lora_too(
    bench: wb.Workbench, tiny_path: Path, lora: dict[str, Path], tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    beyond = {"head": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),  # lm_head replaced
              "embedding": LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])}
    for name, config in beyond.items():
        tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), config)
        tuned.save_pretrained(tmp_path / name, save_embedding_layers=False)  # peft warns when it has to decide
    bench.load("tiny", tiny_path, device="cpu", adapters={"sql": lora["sql"]})
    for name, module in (("head", "lm_head"), ("embedding", "embed_tokens")):
        with pytest.raises(wb.AdapterError, match=f"adapts '{module}' .*the rules allow q_proj, v_proj only"):
            bench.watch_adapter("tiny", name, tmp_path / name, target_modules=["q_proj", "v_proj"])
    assert bench.adapters("tiny")["name"].tolist() == ["sql"]


@pytest.mark.parametrize("door", ["adapters", "adapter"])
def test_an_adapter_with_weights_for_a_layer_that_is_not_linear_is_refused_by_name(
    bench: wb.Workbench, tiny_path: Path, lora: dict[str, Path], tmp_path: Path, door: str
) -> None:
    # Before, the one always-on adapter= skipped these checks: peft loaded it with no more than a warning of missing
    # keys, without the weights it could not place, so the adapter did less than it was trained to.
    from safetensors.torch import load_file, save_file

    crafted = tmp_path / "norm"
    shutil.copytree(lora["sql"], crafted)
    weights = load_file(crafted / "adapter_model.safetensors")
    moved = {key.replace("layers.0.self_attn.q_proj", "layers.0.input_layernorm"): value
             for key, value in weights.items()}
    save_file(moved, crafted / "adapter_model.safetensors")
    with pytest.raises(wb.AdapterError, match=r"'model.layers.0.input_layernorm', a LlamaRMSNorm: .*linear layers"):
        bench.load("normed", tiny_path, device="cpu", **{door: {"sql": crafted} if door == "adapters" else crafted})
    assert bench.models().empty


def test_watching_a_loaded_adapter_at_another_directory_serves_what_that_directory_holds(
    bench: wb.Workbench, tiny_path: Path, lora: dict[str, Path]
) -> None:
    bench.load("tiny", tiny_path, device="cpu", adapters={"sql": lora["sql"]})
    bench.watch_adapter("tiny", "sql", lora["sql_v2"], interval_s=0.05)
    wait_for(lambda: (bench.adapters("tiny")["state"].tolist() == ["retired", "live"]), "sql_v2's weights to serve")
    assert bench.adapters("tiny").loc[1, "path"] == str(lora["sql_v2"])
    expected = by_hand(tiny_path, lora["sql_v2"], PROMPT)
    assert bench.generate("tiny", PROMPT, adapter="sql", max_new_tokens=NEW).token_ids == expected
    bench.unwatch_adapter("tiny", "sql")


def test_an_adapter_watched_by_a_relative_path_is_still_followed_after_the_notebook_changes_directory(
    bench: wb.Workbench, tiny_path: Path, lora: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watcher looked the relative path up again at every poll, from whatever directory the kernel was in by then
    # (%cd): the directory was not there, so the new version never came (or another directory's adapter did).
    shutil.copytree(lora["sql"], tmp_path / "adapters" / "sql")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    bench.load("tiny", tiny_path, device="cpu", adapters={"sql": "adapters/sql"})
    bench.watch_adapter("tiny", "sql", "adapters/sql", interval_s=0.05)
    monkeypatch.chdir(tmp_path / "elsewhere")
    publish(lora["sql_v2"], tmp_path / "adapters" / "sql")
    wait_for(lambda: (bench.adapters("tiny")["state"].tolist() == ["retired", "live"]), "sql_v2's weights to serve")
    assert bench.adapters("tiny")["path"].tolist() == ["adapters/sql", str(tmp_path / "adapters" / "sql")]
    expected = by_hand(tiny_path, lora["sql_v2"], PROMPT)
    assert bench.generate("tiny", PROMPT, adapter="sql", max_new_tokens=NEW).token_ids == expected
    bench.unwatch_adapter("tiny", "sql")


def _rows(bench: wb.Workbench) -> pd.DataFrame:
    return bench.adapters("tiny").query("name == 'sql'").set_index("version")


def test_a_watched_adapter_swaps_in_live_and_refuses_bad_versions(
    bench: wb.Workbench, tiny_path: Path, lora: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watched = tmp_path / "adapters" / "sql"
    shutil.copytree(lora["sql"], watched)
    # A static batch of two that never fills, so a request queued before the swap waits there, holding v1.
    bench.load("tiny", tiny_path, device="cpu", adapters={"sql": watched},
               batching=wb.StaticBatching(size=2, timeout_ms=600_000))
    chain = bench.chain({"name": "ask", "hops": [
        {"name": "answer", "model": "tiny", "adapter": "sql", "prompt": "{{ q }}", "max_new_tokens": NEW}]})
    tokenizer = bench.registry.get("tiny").tokenizer
    v1 = tokenizer.decode(by_hand(tiny_path, lora["sql"], PROMPT), skip_special_tokens=True).strip()
    v2 = tokenizer.decode(by_hand(tiny_path, lora["sql_v2"], PROMPT), skip_special_tokens=True).strip()
    assert v1 != v2

    def memory_mb() -> float:
        return float(bench.models().set_index("name").loc["tiny", "memory_mb"])

    loaded_mb = memory_mb()
    in_flight = bench.start(chain.arun(q=PROMPT))
    wait_for(lambda: _rows(bench).loc[1, "in_flight"] == 1, "the run's request to hold v1")
    bench.watch_adapter("tiny", "sql", watched, interval_s=0.2)
    publish(lora["sql_v2"], watched)
    wait_for(lambda: 2 in _rows(bench).index and _rows(bench).loc[2, "state"] == "live", "v2 to go live")
    rows = _rows(bench)
    assert rows.loc[1, "state"] == "draining" and rows.loc[1, "in_flight"] == 1  # the queued run still holds v1
    assert rows.loc[2, "swap_ms"] > 0 and pd.notna(rows.loc[2, "loaded_at"])
    # Both versions are in memory while v1 drains (models() kept the figure measured at load, adapters and all).
    both_mb = memory_mb()
    assert both_mb > loaded_mb

    bench.set_batching("tiny", wb.DynamicBatching(max_batch=4, max_wait_ms=5))  # let the queued request run
    run = in_flight.result(timeout=DEADLINE_S)
    assert run.output == v1  # it finished on the version it started with
    assert _request_rows(run)["attributes.workbench.adapter.version"].tolist() == [1]
    wait_for(lambda: _rows(bench).loc[1, "state"] == "retired", "v1 to be freed once drained")
    assert memory_mb() == pytest.approx(loaded_mb)  # v2 has v1's shape; v1's weights are gone
    peft_model = bench.registry.get("tiny").model
    v2_bytes = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if ".sql@v2." in n)
    assert both_mb - loaded_mb == pytest.approx(v2_bytes / 2**20, abs=0.01)
    assert "sql@v1" not in peft_model.peft_config and "sql@v2" in peft_model.peft_config
    fresh = chain.run(q=PROMPT)
    assert fresh.output == v2
    assert _request_rows(fresh)["attributes.workbench.adapter.key"].tolist() == ["sql@v2"]

    refusals = {"pickled": "only pickled weights", "mismatched": "another hidden size",
                "corrupt": "not a readable safetensors file"}
    for kind, message in refusals.items():
        publish(lora[kind], watched)
        # A poll may catch the directory half-written (a version of its own); the finished one is refused.
        wait_for(lambda: _rows(bench).query("state == 'refused'")["error"].str.contains(message, regex=False).any(),
                 f"the {kind} adapter to be refused")
        live = _rows(bench).query("state == 'live'")
        assert len(live) == 1 and live.index[0] >= 2  # a version with v2's weights keeps serving
        assert chain.run(q=PROMPT).output == v2
    swaps = bench.traces().table().query("name == 'adapter swap tiny/sql'")
    assert swaps["attributes.workbench.adapter.state"].tolist().count("refused") >= 3
    events = bench.traces().events()
    assert (events["event"] == "adapter.refused").sum() >= 3
    assert any("refused" in record.getMessage() for record in caplog.records if record.levelname == "WARNING")
    bench.unwatch_adapter("tiny", "sql")


def test_a_watched_adapter_is_followed_through_keep_warm_evicting_and_reloading_its_model(
    bench: wb.Workbench, tiny_path: Path, lora: dict[str, Path], tmp_path: Path
) -> None:
    watched, followed = tmp_path / "watched", tmp_path / "followed"
    shutil.copytree(lora["sql"], watched)
    shutil.copytree(lora["sql_v2"], followed)
    bench.register("tiny", tiny_path, device="cpu", adapters={"sql": watched})
    bench.register("other", tiny_path, device="cpu")
    bench.load("tiny")
    bench.set_preloading(wb.KeepWarm(int(1.5 * bench.registry.get("tiny").memory_bytes)))  # one model at a time
    tokens = {kind: by_hand(tiny_path, lora[kind], PROMPT) for kind in ("sql", "sql_v2", "chat")}

    def answer() -> list[int]:  # loads the model back if keep-warm evicted it
        return bench.generate("tiny", PROMPT, adapter="sql", max_new_tokens=NEW).token_ids

    def evict_and_reload() -> None:
        bench.generate("other", PROMPT, max_new_tokens=2)
        assert not bench.registry.is_loaded("tiny")
        answer()

    # Watched where it loaded from: a version written after the model came back still goes live.
    bench.watch_adapter("tiny", "sql", interval_s=0.2)
    evict_and_reload()
    publish(lora["chat"], watched)
    # (A poll may catch the directory half-written, a version of its own: wait for the answer, not a number.)
    wait_for(lambda: answer() == tokens["chat"], "the version written after the reload to go live")
    # Watched at another directory: the model comes back with what the watch follows, not what it loaded first.
    bench.watch_adapter("tiny", "sql", followed, interval_s=0.2)
    wait_for(lambda: answer() == tokens["sql_v2"], "the followed directory's version to go live")
    evict_and_reload()
    assert answer() == tokens["sql_v2"]
    bench.unwatch_adapter("tiny", "sql")


# -- whole models ------------------------------------------------------------------------------


def _weights(base: Path, target: Path, seed: int, *, safe: bool = True, vocab: int | None = None) -> Path:
    """A new version of the tiny model's weights (seeded noise on every weight), pickled unless ``safe``, or a model
    of another vocabulary."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    if vocab is None:
        model = AutoModelForCausalLM.from_pretrained(base)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    else:
        config = AutoConfig.from_pretrained(base)
        config.vocab_size = vocab
        model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    if not safe:  # transformers 5 saves safetensors only: write the pickle a checkpoint of old would hold
        torch.save(model.state_dict(), target / "pytorch_model.bin")
        (target / "model.safetensors").unlink()
    return target


def publish_weights(source: Path, watched: Path) -> None:
    """Replace the config and weights of the model directory ``watched`` with ``source``'s; the tokenizer stays."""
    weights = ("*.safetensors", "*.bin")
    stale = [p for pattern in weights for p in watched.glob(pattern)]
    for file in sorted(source.iterdir(), key=lambda p: p.name == "config.json"):
        shutil.copyfile(file, watched / f".{file.name}.tmp")
        os.replace(watched / f".{file.name}.tmp", watched / file.name)
    for file in stale:
        if not (source / file.name).exists():
            file.unlink()


def test_a_watched_model_swaps_in_live_and_refuses_bad_versions(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    watched = tmp_path / "models" / "m"
    shutil.copytree(tiny_path, watched)
    versions = {"v2": _weights(tiny_path, tmp_path / "v2", seed=7),
                "pickled": _weights(tiny_path, tmp_path / "pickled", seed=8, safe=False),
                "other_vocab": _weights(tiny_path, tmp_path / "other_vocab", seed=9, vocab=600)}
    bench.load("m", watched, device="cpu", batching=wb.StaticBatching(size=2, timeout_ms=600_000))
    params = GenerationParams(max_new_tokens=NEW)
    v1_tokens = by_hand(tiny_path, None, PROMPT)
    queued = bench.engine.submit("m", PROMPT, params)  # waits in the old worker for a batch-mate
    wait_for(lambda: len(bench.engine.worker("m").queue) == 1, "the request to be queued")
    bench.watch_model("m", interval_s=0.2)
    publish_weights(versions["v2"], watched)
    wait_for(lambda: (bench.model_versions("m")["state"].tolist() == ["retired", "live"]), "v2 live and v1 freed")
    assert queued.future.result(timeout=DEADLINE_S).token_ids == v1_tokens  # queued before the swap: ran on v1
    bench.set_batching("m", wb.DynamicBatching(max_batch=4, max_wait_ms=5))  # the new workers kept the static policy
    v2_tokens = bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids
    assert v2_tokens != v1_tokens
    table = bench.model_versions("m").set_index("version")
    assert table.loc[2, "swap_ms"] > 0 and table.loc[1, "retire_ms"] >= 0

    for kind, message in {"pickled": "only pickle weights", "other_vocab": "vocab_size 600"}.items():
        publish_weights(versions[kind], watched)
        # A poll may catch the directory half-written (a version of its own); the finished one is refused.
        wait_for(lambda: bench.model_versions("m").query("state == 'refused'")["error"]
                 .str.contains(message, regex=False).any(), f"the {kind} model to be refused")
        assert bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == v2_tokens  # v2's weights serve on
    bench.unwatch_model("m")


def test_a_watched_model_is_followed_through_keep_warm_evicting_and_reloading_it(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    watched = tmp_path / "models" / "m"
    shutil.copytree(tiny_path, watched)
    v2 = _weights(tiny_path, tmp_path / "v2", seed=7)
    bench.register("m", watched, device="cpu")
    bench.register("other", tiny_path, device="cpu")
    bench.load("m")
    bench.set_preloading(wb.KeepWarm(int(1.5 * bench.registry.get("m").memory_bytes)))  # one model at a time
    bench.watch_model("m", interval_s=0.2)
    bench.generate("other", PROMPT, max_new_tokens=2)
    assert not bench.registry.is_loaded("m")
    assert bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == by_hand(tiny_path, None, PROMPT)  # back
    publish_weights(v2, watched)
    expected = by_hand(watched, None, PROMPT)  # v2's weights, the model's tokenizer
    # (A poll may catch the directory half-written, a version of its own: wait for the answer, not a number.)
    wait_for(lambda: bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == expected,
             "the version written after the reload to go live")
    assert bench.model_versions("m").query("state == 'live'")["version"].tolist() >= [2]
    bench.unwatch_model("m")


def test_watching_a_model_that_carries_named_adapters_is_refused_at_once(
    bench: wb.Workbench, tiny_path: Path, lora: dict[str, Path]
) -> None:
    # Every new version of such a model is refused (its adapters were trained on these weights), so the watch is.
    bench.load("tiny", tiny_path, device="cpu", adapters={"sql": lora["sql"]})
    with pytest.raises(wb.ModelLoadError, match="model 'tiny' carries named adapters") as refused:
        bench.watch_model("tiny")
    assert "bench.watch_adapter" in refused.value.hint
    assert bench.model_versions("tiny").empty  # nothing is watched
    expected = by_hand(tiny_path, lora["sql"], PROMPT)
    assert bench.generate("tiny", PROMPT, adapter="sql", max_new_tokens=NEW).token_ids == expected


def test_watching_a_model_at_another_directory_serves_the_weights_there(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    newer = tmp_path / "newer"
    shutil.copytree(tiny_path, newer)
    publish_weights(_weights(tiny_path, tmp_path / "v2", seed=7), newer)
    bench.load("m", tiny_path, device="cpu")
    bench.watch_model("m", newer, interval_s=0.05)
    wait_for(lambda: bench.model_versions("m")["state"].tolist() == ["retired", "live"], "the newer weights to serve")
    assert bench.model_versions("m").loc[1, "path"] == str(newer)
    assert bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == by_hand(newer, None, PROMPT)
    bench.unwatch_model("m")


def test_a_version_written_to_another_directory_while_the_model_is_evicted_goes_live_once_it_is_back(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    # The watcher counted the version seen while keep-warm had the model out; the model loaded back from its own
    # folder, and the newer weights in the watched one never served.
    newer = tmp_path / "newer"
    shutil.copytree(tiny_path, newer)  # the same weights for now: nothing to swap
    v2 = _weights(tiny_path, tmp_path / "v2", seed=7)
    bench.register("m", tiny_path, device="cpu")
    bench.register("other", tiny_path, device="cpu")
    bench.load("m")
    bench.set_preloading(wb.KeepWarm(int(1.5 * bench.registry.get("m").memory_bytes)))  # one model at a time
    bench.watch_model("m", newer, interval_s=0.1)
    bench.generate("other", PROMPT, max_new_tokens=2)
    assert not bench.registry.is_loaded("m")
    publish_weights(v2, newer)
    time.sleep(1.0)  # several polls while it is evicted
    assert not bench.registry.is_loaded("m")
    expected = by_hand(newer, None, PROMPT)
    wait_for(lambda: bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == expected,
             "the version written while the model was evicted to go live once it is back")
    assert bench.model_versions("m").query("state == 'live'")["path"].tolist() == [str(newer)]
    bench.unwatch_model("m")


def _refused(bench: wb.Workbench, message: str) -> pd.DataFrame:
    """Wait until a version of 'm' is refused with ``message`` in its error; its rows."""
    def rows() -> pd.DataFrame:
        table = bench.model_versions("m")
        return table[(table["state"] == "refused") & table["error"].str.contains(message, regex=False, na=False)]
    wait_for(lambda: not rows().empty, f"a version refused with {message!r}")
    return rows()


def _watched_beside_other(bench: wb.Workbench, tiny_path: Path, tmp_path: Path, *, models_kept: int = 1,
                          interval_s: float = 0.05) -> Path:
    """'m' loaded from a copy of the tiny model and watched there, 'other' registered beside it, keep-warm holding
    ``models_kept`` models at a time; the watched folder."""
    watched = tmp_path / "m"
    shutil.copytree(tiny_path, watched)
    bench.register("m", watched, device="cpu")
    bench.register("other", tiny_path, device="cpu")
    bench.load("m")
    bench.set_preloading(wb.KeepWarm(int((models_kept + 0.5) * bench.registry.get("m").memory_bytes)))
    bench.watch_model("m", interval_s=interval_s)
    return watched


def test_a_version_the_watcher_read_before_the_folder_changed_again_is_not_swapped_in_under_its_old_digest(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    # A write the watcher took for settled, finished while the model loaded back and checked the folder's final
    # content as version 3: the watcher then staged its older digest, loaded the final content beside under it as
    # version 4, and swapped that in (CI saw [3, "draining"], [4, "live"] for one version of the weights).
    watched = _watched_beside_other(bench, tiny_path, tmp_path, interval_s=3600)  # no poll of its own in this test
    versions = bench.model_versions("m")[["version", "state"]].values.tolist()
    stale = "0123456789abcdef"  # what the folder held when the watcher read it, no longer there
    assert bench._stage_model("m", str(watched), GOLDEN_PROMPTS, stale, time.perf_counter()) is None
    assert bench.model_versions("m")[["version", "state"]].values.tolist() == versions == [[1, "live"]]
    assert bench.registry.is_loaded("m")


def test_a_version_the_watcher_stages_while_the_model_loads_back_with_it_is_one_version(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watcher saw the folder change just as keep-warm's load back of the model checked it, and both made a
    # version of the same weights: the load back's went live, then the watcher's was switched in over it (CI saw
    # [3, "draining"], [4, "live"]). Here the watcher stages at that moment, on purpose: its load beside waits
    # until the load back has checked the folder.
    watched = _watched_beside_other(bench, tiny_path, tmp_path, interval_s=3600)  # no poll of its own in this test
    bench.generate("other", PROMPT, max_new_tokens=2)
    assert not bench.registry.is_loaded("m")
    publish_weights(_weights(tiny_path, tmp_path / "v2", seed=7), watched)
    digest = content_digest(str(watched), "config.json")
    staged, checked = threading.Event(), threading.Event()
    load_beside, check = bench.registry.load_beside, bench.engine.preloader.check_loaded
    watcher: list[object] = []

    def stage() -> None:
        watcher.append(bench._stage_model("m", str(watched), GOLDEN_PROMPTS, digest, time.perf_counter()))

    def load_beside_after_the_check(*args: Any, **kwargs: Any) -> Any:
        staged.set()
        assert checked.wait(60)
        return load_beside(*args, **kwargs)

    def check_while_the_watcher_stages(name: str, loaded: Any) -> None:
        staging = threading.Thread(target=stage)
        staging.start()
        assert staged.wait(60)
        try:
            check(name, loaded)
        finally:
            checked.set()
            staging.join(60)

    monkeypatch.setattr(bench.registry, "load_beside", load_beside_after_the_check)
    monkeypatch.setattr(bench.engine.preloader, "check_loaded", check_while_the_watcher_stages)
    assert bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == by_hand(watched, None, PROMPT)
    assert bench.model_versions("m")[["version", "state"]].values.tolist() == [[1, "retired"], [2, "live"]]
    assert [getattr(v, "state", v) for v in watcher] == ["live"]  # the watcher found it decided, and switched nothing
    assert bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == by_hand(watched, None, PROMPT)


def _kept_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return [message for message in said if "keep-warm keeps" in message]


def test_keep_warm_does_not_evict_a_watched_model_whose_folder_holds_a_refused_version_until_a_good_one_serves(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before, keep-warm evicted it, and the next use loaded back what its folder held: the refused weights (here a
    # model of another vocabulary), which then served as the model while model_versions() still said version 1.
    watched = tmp_path / "models" / "m"
    shutil.copytree(tiny_path, watched)
    other_vocab = _weights(tiny_path, tmp_path / "other_vocab", seed=9, vocab=600)
    v2 = _weights(tiny_path, tmp_path / "v2", seed=7)
    for name, source in {"m": watched, "a": tiny_path, "b": tiny_path}.items():
        bench.register(name, source, device="cpu")
    bench.load("m")
    one_model = bench.registry.get("m").memory_bytes
    bench.set_preloading(wb.KeepWarm(int(2.5 * one_model)))  # two models at a time
    v1_tokens = bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids
    bench.watch_model("m", interval_s=0.1)
    publish_weights(other_vocab, watched)
    refused = _refused(bench, "vocab_size 600")
    version = refused["version"].iloc[-1]

    bench.generate("a", PROMPT, max_new_tokens=2)
    bench.generate("b", PROMPT, max_new_tokens=2)  # room for b: 'm' is the least recently used, but it stays
    assert [n for n in ("m", "a", "b") if bench.registry.is_loaded(n)] == ["m", "b"]
    bench.generate("a", PROMPT, max_new_tokens=2)  # passes 'm' over again: said once
    assert [n for n in ("m", "a", "b") if bench.registry.is_loaded(n)] == ["m", "a"]
    assert bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == v1_tokens  # version 1 serves on
    [said] = _kept_warnings(caplog)
    assert f"{watched} holds version {version}, which was refused" in said and "vocab_size 600" in said
    assert "could not load back version 1" in said

    # Where only 'm' could make the room, a load fails at once, saying why 'm' stays.
    bench.set_preloading(wb.KeepWarm(int(1.5 * one_model)))  # 'a' goes, 'm' stays
    with pytest.raises(wb.ModelLoadError, match=r"no room within the keep-warm budget .* to load 'b': 'm' stays "
                                                r"loaded: .* holds version \d+, which was refused") as no_room:
        bench.generate("b", PROMPT, max_new_tokens=2)
    assert "bench.unload" in no_room.value.hint
    assert bench.registry.is_loaded("m") and not bench.registry.is_loaded("a")

    # A good version goes live: 'm' could load it back, and keep-warm evicts it as any model again.
    publish_weights(v2, watched)
    expected = by_hand(watched, None, PROMPT)
    wait_for(lambda: bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == expected, "v2 to serve")
    bench.generate("b", PROMPT, max_new_tokens=2)
    assert not bench.registry.is_loaded("m")
    assert bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == expected  # back, from its folder
    bench.unwatch_model("m")


def test_a_watched_model_is_not_evicted_while_its_folder_holds_a_version_not_checked_yet(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before, it was evicted, and loaded back the new weights without any check.
    watched = _watched_beside_other(bench, tiny_path, tmp_path, models_kept=2, interval_s=3600)  # no poll comes
    publish_weights(_weights(tiny_path, tmp_path / "v2", seed=7), watched)
    bench.set_preloading(wb.KeepWarm(int(1.5 * bench.registry.get("m").memory_bytes)))
    with pytest.raises(wb.ModelLoadError, match="'m' stays loaded: .* holds a new version, not checked yet"):
        bench.generate("other", PROMPT, max_new_tokens=2)
    assert len(_kept_warnings(caplog)) == 1
    bench.watch_model("m", interval_s=0.05)  # the watch, polling, checks it and swaps it in
    wait_for(lambda: bench.model_versions("m")["state"].tolist() == ["retired", "live"], "v2 to serve")
    bench.generate("other", PROMPT, max_new_tokens=2)
    assert not bench.registry.is_loaded("m")
    bench.unwatch_model("m")


def test_a_model_unloaded_while_its_folder_holds_a_refused_version_does_not_load_it_back(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    # Before, the next use loaded the refused weights (another vocabulary) without a word.
    watched = tmp_path / "m"
    shutil.copytree(tiny_path, watched)
    bench.load("m", watched, device="cpu")
    bench.watch_model("m", interval_s=0.05)
    publish_weights(_weights(tiny_path, tmp_path / "other_vocab", seed=9, vocab=600), watched)
    version = _refused(bench, "vocab_size 600")["version"].iloc[-1]
    bench.unload("m")
    expected = rf"model 'm' cannot load from {re.escape(str(watched))}: it holds version {version}, which was " \
               r"refused \(.*vocab_size 600"
    with pytest.raises(wb.ModelLoadError, match=expected) as refused:
        bench.generate("m", PROMPT, max_new_tokens=2)
    assert "forget=True" in refused.value.hint
    with pytest.raises(wb.ModelLoadError, match=expected):
        bench.load("m")
    assert not bench.registry.is_loaded("m")
    v2 = _weights(tiny_path, tmp_path / "v2", seed=7)
    publish_weights(v2, watched)  # another version: it loads, as a model loads after an unload
    assert bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == by_hand(watched, None, PROMPT)
    bench.unload("m", forget=True)  # starting anew, the version refused as a successor is a model like any
    publish_weights(tmp_path / "other_vocab", watched)
    assert bench.load("m", watched, device="cpu").model.config.vocab_size == 600


def test_a_watched_folder_that_is_gone_is_refused_as_a_folder_that_does_not_exist_and_the_model_stays(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    watched = _watched_beside_other(bench, tiny_path, tmp_path)
    shutil.rmtree(watched)
    error = _refused(bench, "does not exist")["error"].iloc[-1]
    assert error == f"{str(watched)!r} does not exist"  # was "is not a directory"
    with pytest.raises(wb.ModelLoadError, match=f"'m' stays loaded: {re.escape(str(watched))} does not exist"):
        bench.generate("other", PROMPT, max_new_tokens=2)
    assert bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == by_hand(tiny_path, None, PROMPT)
    bench.unwatch_model("m")


def test_a_live_swap_keeps_the_breakers_set_and_the_faults_injected_on_each_replica(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    watched = tmp_path / "m"
    shutil.copytree(tiny_path, watched)
    bench.load("m", watched, device="cpu", replicas=2)
    bench.set_breaker("m#1", failure_threshold=2, reset_timeout_s=30)
    bench.inject("m#0", error_rate=1.0, seed=0)
    bench.watch_model("m", interval_s=0.05)
    publish_weights(_weights(tiny_path, tmp_path / "v2", seed=7), watched)
    wait_for(lambda: bench.model_versions("m")["state"].tolist() == ["retired", "live"], "v2 to serve")
    bench.unwatch_model("m")
    # The new weights serve under the resilience study set up on the model, not the defaults.
    breakers = bench.breakers().set_index("model")
    assert breakers.loc["m#1", ["failure_threshold", "reset_timeout_s"]].tolist() == [2, 30]
    assert breakers.loc["m#0", ["failure_threshold", "reset_timeout_s"]].tolist() == [5, 5]
    assert bench.replicas().set_index("replica")["faults"].to_dict() == {"m#0": True, "m#1": False}
    with pytest.raises(wb.InjectedFault):
        bench.generate("m#0", PROMPT, max_new_tokens=2)
    assert bench.generate("m#1", PROMPT, max_new_tokens=NEW).token_ids == by_hand(watched, None, PROMPT)


def test_continuous_batching_is_refused_for_a_model_with_adapters(adapted: wb.Workbench) -> None:
    with pytest.raises(wb.AdapterError, match="carries named LoRA adapters"):
        adapted.set_batching("tiny", wb.ContinuousBatching())
    assert adapted.engine.policy("tiny").name.startswith("dynamic")  # the policy in force stays


def test_an_exact_cached_adapter_hop_loads_a_registered_model_on_first_use(
    tiny_path: Path, lora: dict[str, Path], tmp_path: Path
) -> None:
    """A registered model loads on its first request, cache or not: the adapter's live version, which the cache key
    needs, is not known before the load, so the first call goes to the model uncached (it failed: 'registered but
    not loaded'; keyed without a version it would have shared the base model's answers), and later calls cache."""
    with wb.Workbench(data_dir=tmp_path / "data") as bench:
        bench.register("tiny", tiny_path, device="cpu", adapters={"sql": lora["sql"]})
        chain = bench.chain({"name": "ask", "hops": [
            {"name": "answer", "model": "tiny", "adapter": "sql", "prompt": "{{ q }}", "max_new_tokens": NEW,
             "cache": "exact"}]})
        runs = [chain.run(q=PROMPT) for _ in range(3)]
        tokenizer = bench.registry.get("tiny").tokenizer
        tuned = tokenizer.decode(by_hand(tiny_path, lora["sql"], PROMPT), skip_special_tokens=True).strip()
        assert [run.output for run in runs] == [tuned] * 3
        hit = [dict(next(s for s in run.trace.spans if s.name == "hop answer").attributes).get(attr.CACHE_HIT)
               for run in runs]
        assert hit == [None, False, True]


def test_the_exact_cache_keys_an_adapter_hop_by_its_live_versions_files(
    tiny_path: Path, lora: dict[str, Path], tmp_path: Path
) -> None:
    """A cached answer of sql v1 must not answer for sql v2: the key holds the live version's digest. And a model with
    named adapters keeps no prefix KV (a prefix's KV depends on the row's adapter), so `cache: prefix` prefills whole."""
    watched = tmp_path / "adapters" / "sql"
    shutil.copytree(lora["sql"], watched)
    with wb.Workbench(data_dir=tmp_path / "data") as bench:
        bench.load("tiny", tiny_path, device="cpu", adapters={"sql": watched})
        chain = bench.chain({"name": "ask", "hops": [
            {"name": "answer", "model": "tiny", "adapter": "sql", "prompt": "Say: {{ q }}", "max_new_tokens": NEW,
             "cache": ["exact", "prefix"]}]})
        first = chain.run(q=PROMPT)
        again = chain.run(q=PROMPT)
        def hop(run: wb.Run) -> dict[str, object]:
            return dict(next(s for s in run.trace.spans if s.name == "hop answer").attributes)

        assert hop(first)[attr.CACHE_HIT] is False and hop(again)[attr.CACHE_HIT] is True
        assert again.output == first.output
        assert attr.PREFIX_TOKENS not in hop(first) and attr.PREFIX_TOKENS not in hop(again)  # no prefix KV here
        bench.watch_adapter("tiny", "sql", watched, interval_s=0.2)
        publish(lora["sql_v2"], watched)
        wait_for(lambda: 2 in _rows(bench).index and _rows(bench).loc[2, "state"] == "live", "v2 to go live")
        after = chain.run(q=PROMPT)
        assert hop(after)[attr.CACHE_HIT] is False  # new files, new key
        assert hop(after)[attr.CACHE_KEY] != hop(first)[attr.CACHE_KEY]
        tokenizer = bench.registry.get("tiny").tokenizer
        v2 = tokenizer.decode(by_hand(tiny_path, lora["sql_v2"], "Say: " + PROMPT), skip_special_tokens=True).strip()
        assert after.output == v2


# -- hostile names and directories -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "message"), [
    ("__base__", "'__base__' stands for the base model"),
    ("my.sql", "'my.sql' is not a name a hop can use"),
    ("sql@v2", "'sql@v2' is not a name a hop can use"),
    ("", "'' is not a name a hop can use"),
])
def test_watching_an_adapter_by_a_name_no_hop_could_pick_is_refused_and_adds_nothing(
    bench: wb.Workbench, tiny_path: Path, lora: dict[str, Path], name: str, message: str
) -> None:
    # It was attached as is: '__base__' then shadowed the base model's name in mixed batches, 'sql@v2' looked like a
    # version of 'sql', '' could be picked by no hop, and 'my.sql' failed inside peft with advice about the weights.
    bench.load("tiny", tiny_path, device="cpu", adapters={"sql": lora["sql"]})
    with pytest.raises(wb.AdapterError, match=re.escape(message)) as refused:
        bench.watch_adapter("tiny", name, lora["chat"], interval_s=60)
    assert refused.value.hint and "adapter:" in refused.value.hint
    assert bench.adapters("tiny")["name"].tolist() == ["sql"]
    assert bench.registry.adapters()["tiny"] == ["sql"]


def test_watching_an_adapter_at_a_directory_it_cannot_serve_from_is_refused_and_the_model_still_loads_back(
    bench: wb.Workbench, tiny_path: Path, lora: dict[str, Path], tmp_path: Path
) -> None:
    # The model followed the directory before anything read it: the watcher refused its version, sql@v1 served on,
    # and then the model could not load back at all after an unload (or keep-warm evicting it).
    bench.load("tiny", tiny_path, device="cpu", adapters={"sql": lora["sql"]})
    for directory, message in ((tmp_path / "typo", "does not exist"), (lora["pickled"], "only pickled weights"),
                               (lora["mismatched"], "another hidden size")):
        with pytest.raises(wb.AdapterError, match=re.escape(message)) as refused:
            bench.watch_adapter("tiny", "sql", directory, interval_s=0.05)
        assert f"cannot watch adapter 'sql' of model 'tiny' at {str(directory)!r}" in refused.value.message
        assert str(lora["sql"]) in refused.value.message and refused.value.hint
    assert bench.adapters("tiny")[["version", "state"]].values.tolist() == [[1, "live"]]
    bench.unload("tiny")
    expected = by_hand(tiny_path, lora["sql"], PROMPT)
    assert bench.generate("tiny", PROMPT, adapter="sql", max_new_tokens=NEW).token_ids == expected


def test_two_swaps_at_once_never_put_an_older_version_in_place_of_a_newer_one(
    tiny_path: Path, lora: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # v2 still being checked when v3 went live: v2 then switched in over v3, and the newer files stopped serving.
    from workbench.models.adapters import AdapterSet

    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu", adapters={"sql": lora["sql"]})
        adapters = bench.registry.get("tiny").adapters
        assert adapters is not None
        check, newer, staging = AdapterSet._check_logits, [], []

        def check_logits(self: AdapterSet, version: Any, rules: Any) -> None:
            check(self, version, rules)
            if not staging:  # while v2 is checked, v3 is staged and goes live
                staging.append(True)
                newer.append(self.stage("sql", lora["chat"]))

        monkeypatch.setattr(AdapterSet, "_check_logits", check_logits)
        older = adapters.stage("sql", lora["sql_v2"])
        (latest,) = newer
        assert (older.version, latest.version) == (2, 3)
        assert adapters.live("sql") is latest
        assert older.state == "retired" and "v3" in (older.error or "")
        rows = bench.adapters("tiny").query("name == 'sql'").set_index("version")
        assert rows.loc[3, "state"] == "live" and rows.loc[2, "state"] == "retired"


def _bytes_read() -> int:
    """Bytes this process has read from files and sockets so far (Linux's /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts the bytes read through Linux's /proc/self/io")
def test_a_folder_whose_files_are_unchanged_is_not_read_again_for_its_digest_but_any_rewrite_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A watch hashed every weights file at every poll: 1 GB took 0.93 s here, so a 7B model's 15 GB kept a core busy.
    from workbench.models import adapters

    weights = tmp_path / "model.safetensors"
    (tmp_path / "config.json").write_text("{}")
    weights.write_bytes(os.urandom(32 << 20))
    first = adapters.content_digest(tmp_path, "config.json")
    before = _bytes_read()
    assert adapters.content_digest(tmp_path, "config.json") == first
    assert _bytes_read() - before >= 32 << 20  # written just now: its clock may not have ticked yet, so read again

    monkeypatch.setattr(adapters, "_RACY_S", 0.0)  # as if it had been written seconds ago
    adapters.content_digest(tmp_path, "config.json")
    before = _bytes_read()
    assert adapters.content_digest(tmp_path, "config.json") == first
    assert _bytes_read() - before < 1 << 20  # its stats alone

    # Rewritten in place, same size, its mtime set back: the change time still moves, and the new bytes are hashed.
    info = weights.stat()
    with open(weights, "r+b") as handle:
        handle.write(b"\xff" * 16)
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert weights.stat().st_size == info.st_size and weights.stat().st_mtime_ns == info.st_mtime_ns
    assert adapters.content_digest(tmp_path, "config.json") != first
    # And replaced by another file with the old one's bytes: the same version again.
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "copy")
    os.replace(tmp_path / "copy", weights)
    assert adapters.content_digest(tmp_path, "config.json") == adapters._hashed([tmp_path / "config.json", weights])


def test_a_version_written_into_the_models_own_folder_while_it_is_evicted_is_checked_as_it_loads_back(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    # The watch counted it seen while keep-warm had the model out, and the next use loaded it unchecked: a model of
    # another vocabulary served, model_versions() still said version 1, and keep-warm then never let the model go
    # ("a new version, not checked yet").
    watched = _watched_beside_other(bench, tiny_path, tmp_path)
    bench.generate("other", PROMPT, max_new_tokens=2)
    assert not bench.registry.is_loaded("m")
    publish_weights(_weights(tiny_path, tmp_path / "other_vocab", seed=9, vocab=600), watched)
    time.sleep(0.5)  # polls while it is evicted
    with pytest.raises(wb.ModelLoadError, match=r"model 'm' cannot load from .*: it holds version 2, which was refused "
                                                r"\(it has vocab_size 600, the serving one 512\)"):
        bench.generate("m", PROMPT, max_new_tokens=2)
    assert not bench.registry.is_loaded("m")
    assert bench.model_versions("m")[["version", "state"]].values.tolist() == [[1, "live"], [2, "refused"]]

    # A good version written while it is out: checked as it loads back, then serving, and evicted as any model.
    v3 = _weights(tiny_path, tmp_path / "v3", seed=7)
    publish_weights(v3, watched)
    expected = by_hand(watched, None, PROMPT)
    assert bench.generate("m", PROMPT, max_new_tokens=NEW).token_ids == expected
    time.sleep(0.3)  # the watch sees it serving already: nothing to swap
    versions = bench.model_versions("m")
    assert versions[["version", "state"]].values.tolist() == [[1, "retired"], [2, "refused"], [3, "live"]]
    bench.generate("other", PROMPT, max_new_tokens=2)
    assert not bench.registry.is_loaded("m")
    bench.unwatch_model("m")
