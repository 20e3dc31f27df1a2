"""The model registry and the tiny model: building, loading, refusing, unloading, adapters."""

from __future__ import annotations

import gc
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.models.registry import LoadSettings

PROMPT = "Question: What is the capital of France?\nPlan:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


# -- the tiny model ----------------------------------------------------------------------------

_BUILD = "import sys, workbench; print(workbench.tiny_model(seed=int(sys.argv[1]), cache_dir=sys.argv[2]))"


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Builds, side by side: two processes race on one fresh cache; this process builds seeds 0 and 1."""
    shared = tmp_path_factory.mktemp("shared-cache")
    racers = [
        subprocess.Popen([sys.executable, "-c", _BUILD, "0", str(shared)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        seed0 = wb.tiny_model(seed=0, cache_dir=tmp_path_factory.mktemp("seed0-cache"))
        seed1 = wb.tiny_model(seed=1, cache_dir=tmp_path_factory.mktemp("seed1-cache"))
        raced = []
        for proc in racers:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            raced.append(Path(out.strip().splitlines()[-1]))
    finally:
        for proc in racers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"shared": shared, "raced": raced, "seed0": seed0, "seed1": seed1}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_same_seed_builds_identical_model_and_other_seed_differs(builds: dict) -> None:
    seed0, seed1, raced = builds["seed0"], builds["seed1"], builds["raced"][0]
    assert _files(seed0) == _files(raced)  # built in another process, from scratch
    assert seed0.name == raced.name
    assert (seed0 / "model.safetensors").read_bytes() != (seed1 / "model.safetensors").read_bytes()
    assert seed0.name != seed1.name


@pytest.mark.slow
def test_concurrent_builders_share_one_valid_directory(builds: dict) -> None:
    first, second = builds["raced"]
    assert first == second
    assert first.parent == builds["shared"]
    assert sorted(p.name for p in builds["shared"].iterdir()) == [first.name]  # no .build-* left behind
    assert {"config.json", "model.safetensors", *TOKENIZER_FILES} <= set(_files(first))
    with wb.Workbench() as bench:
        assert bench.load("raced", first, device="cpu").params > 0


@pytest.mark.slow
def test_second_call_returns_the_cached_directory_without_building(builds: dict) -> None:
    built: Path = builds["seed0"]
    root = built.parent

    def state() -> tuple[int, list[str], int]:
        return root.stat().st_mtime_ns, sorted(os.listdir(root)), (built / "model.safetensors").stat().st_mtime_ns

    before = state()
    assert wb.tiny_model(seed=0, cache_dir=root) == built
    assert state() == before  # a rebuild would have created (and removed) a .build-* directory in the root


# -- loading -----------------------------------------------------------------------------------


def test_load_records_size_memory_time_device_and_dtype(tiny_bench: wb.Workbench, tiny_path: Path) -> None:
    loaded = tiny_bench.registry.get("tiny")
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32  # what "auto" means on the CPU
    assert loaded.params == sum(p.numel() for p in loaded.model.parameters()) > 0
    assert loaded.memory_bytes >= loaded.params * 4
    assert loaded.load_s > 0
    assert loaded.context_window == 512

    row = tiny_bench.models().set_index("name").loc["tiny"]
    assert row["source"] == str(tiny_path)
    assert (row["device"], row["dtype"], row["state"]) == ("cpu", "float32", "loaded")
    assert row["params"] == loaded.params
    assert row["memory_mb"] == pytest.approx(loaded.memory_bytes / 2**20, abs=0.01)
    assert row["load_s"] == pytest.approx(loaded.load_s, abs=1e-3)


@pytest.mark.parametrize("setting", [{"served_model": "qwen"}, {"api_key": "sk-secret"}, {"read_timeout_s": 5}])
def test_a_server_setting_on_a_model_loaded_here_is_refused_not_ignored(
    tiny_bench: wb.Workbench, tiny_path: Path, setting: dict[str, Any]
) -> None:
    # A setting that only a model on a server reads was dropped without a word: the user thought it applied.
    (given,) = setting
    for call in (tiny_bench.register, tiny_bench.load):
        with pytest.raises(wb.ModelLoadError, match=f"{given} is a setting of a model on a server") as info:
            call("here", tiny_path, device="cpu", **setting)
        assert "sk-secret" not in str(info.value)  # a key is never shown
        assert "here" not in tiny_bench.registry.names()
    # Beside a server in a mixed replica set it is the server's setting (tests/test_mixed_replicas.py loads one).


def test_models_table_lists_loaded_and_registered_models(tiny_bench: wb.Workbench, tiny_path: Path) -> None:
    tiny_bench.register("later", tiny_path, device="cpu")
    try:
        table = tiny_bench.models()
        assert list(table.columns) == ["name", "source", "adapter", "device", "dtype", "isolation", "params",
                                       "memory_mb", "load_s", "state", "cold_start_s", "last_used", "health",
                                       "batch_limit", "replicas", "in_flight", "served", "pid", "restarts"]
        states = dict(zip(table["name"], table["state"], strict=True))
        assert states == {"tiny": "loaded", "later": "registered"}
        later = table.set_index("name").loc["later"]
        assert later["source"] == str(tiny_path)
        assert pd.isna(later["params"]) and pd.isna(later["memory_mb"])  # not loaded: nothing measured yet
        assert pd.isna(later["cold_start_s"]) and pd.isna(later["last_used"])
    finally:
        tiny_bench.unload("later", forget=True)
    assert list(tiny_bench.models()["name"]) == ["tiny"]


@pytest.fixture
def pickle_dir(tiny_bench: wb.Workbench, tiny_path: Path, tmp_path: Path) -> Path:
    """The tiny model with its weights saved as a pickle (pytorch_model.bin) instead of safetensors."""
    target = tmp_path / "pickled"
    target.mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(tiny_path / name, target / name)
    torch.save(tiny_bench.registry.get("tiny").model.state_dict(), target / "pytorch_model.bin")
    return target


def test_pickle_weights_are_refused_unless_allowed(tiny_bench: wb.Workbench, pickle_dir: Path) -> None:
    with pytest.raises(wb.ModelLoadError, match="pickle") as info:
        tiny_bench.load("pickled", pickle_dir, device="cpu")
    assert "allow_pickle=True" in str(info.value)
    assert "pickled" not in tiny_bench.registry.names()

    tiny_bench.load("pickled", pickle_dir, device="cpu", allow_pickle=True)
    try:
        same = tiny_bench.generate("pickled", PROMPT, max_new_tokens=12)
        assert same.token_ids == tiny_bench.generate("tiny", PROMPT, max_new_tokens=12).token_ids
    finally:
        tiny_bench.unload("pickled", forget=True)


def _no_config_dir(tmp_path: Path, tiny_path: Path) -> Path:
    target = tmp_path / "no-config"
    target.mkdir()
    shutil.copy(tiny_path / "model.safetensors", target / "model.safetensors")
    return target


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("not-a-directory", "is not a directory"),
        ("no-config", "no config.json"),
        ("unknown-device", "unknown device 'gpu0'"),
        ("unknown-dtype", "unknown dtype 'int3'"),
        ("integer-dtype", "dtype torch.int8 is not a floating-point type"),
        ("name-taken", "'tiny' is already loaded"),
        ("device-none", "device must be a name such as 'cpu' or 'cuda:0', not None"),
        ("device-number", "not 0 \\(for GPU 0, 'cuda:0'\\)"),
        ("dtype-none", "dtype must be a name such as 'float32', not None"),
        ("bad-config", "StrictDataclassFieldValidationError: .*'hidden_size' expected int, got str"),
        ("truncated-weights", "SafetensorError"),
        ("relative-missing", "'models/tiny' does not exist \\(relative paths start at "),
        ("relative-unknown", "'modles/tiny' is not a local directory, and as a hub id it is not in the Hugging Face"),
    ],
)
def test_clear_load_errors(
    case: str, match: str, tiny_bench: wb.Workbench, tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source: Path | str = tiny_path
    kwargs: dict[str, Any] = {"device": "cpu"}
    name = "other"
    if case.startswith("relative"):
        (tmp_path / "models").mkdir()
        monkeypatch.chdir(tmp_path)
        # Offline, as CI is; on a machine that reaches the hub the check would look there instead.
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        source = "models/tiny" if case == "relative-missing" else "modles/tiny"
    elif case in ("bad-config", "truncated-weights"):
        source = tmp_path / case
        shutil.copytree(tiny_path, source)
        if case == "bad-config":
            config = json.loads((source / "config.json").read_text())
            (source / "config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
        else:
            weights = (source / "model.safetensors").read_bytes()
            (source / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif case in ("device-none", "device-number", "dtype-none"):
        kwargs = {"device-none": {"device": None}, "device-number": {"device": 0}, "dtype-none": {"dtype": None}}[case]
    elif case == "not-a-directory":
        source = tiny_path / "config.json"
    elif case == "no-config":
        source = _no_config_dir(tmp_path, tiny_path)
    elif case == "unknown-device":
        kwargs["device"] = "gpu0"
    elif case == "unknown-dtype":
        kwargs["dtype"] = "int3"
    elif case == "integer-dtype":  # was transformers' ValueError, with the hint to check the path
        kwargs["dtype"] = torch.int8
    elif case == "name-taken":  # under other settings (the same load again gives the loaded model)
        name, kwargs["warmup"] = "tiny", True
    with pytest.raises(wb.ModelLoadError, match=match) as info:
        tiny_bench.load(name, source, **kwargs)
    assert info.value.hint  # says what to do
    assert sorted(tiny_bench.registry.names()) == ["tiny"]
    assert tiny_bench.generate("tiny", PROMPT, max_new_tokens=2).tokens_out == 2  # the loaded one is untouched


def test_the_same_load_again_gives_the_loaded_model_unless_its_files_changed(tiny_path: Path, tmp_path: Path) -> None:
    # A notebook's load cell run a second time raised "a model named 'tiny' is already loaded", a traceback in the
    # middle of "run all". The same load from the same files is now the model already loaded; other settings, or
    # files changed since (a new checkpoint saved there), are refused as before.
    path = Path(shutil.copytree(tiny_path, tmp_path / "tiny"))
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        first = bench.load("tiny", path, device="cpu")
        assert bench.load("tiny", path, device="cpu") is first
        assert bench.load("tiny", str(path), device="cpu") is first
        with pytest.raises(wb.ModelLoadError, match="already loaded"):
            bench.load("tiny", path, device="cpu", dtype="bfloat16")
        with pytest.raises(wb.ModelLoadError, match="already loaded"):
            bench.load("tiny", path, device="cpu", replicas=2)
        later = time.time() + 5
        os.utime(path / "model.safetensors", (later, later))  # the weights file is another version now
        with pytest.raises(wb.ModelLoadError, match="already loaded"):
            bench.load("tiny", path, device="cpu")
        assert bench.registry.get("tiny") is first


@pytest.mark.parametrize("settings", [
    {"source": "/tmp/" + "x" * 300}, {"source": "y" * 256}, {"adapter": "z" * 300}, {"adapters": {"s": "q" * 300}}],
    ids=["source-path", "source-word", "adapter", "named-adapter"])
def test_a_path_no_file_system_holds_is_a_clear_load_error(bench: wb.Workbench, tiny_path: Path,
                                                           settings: dict[str, Any]) -> None:
    # Asking whether such a path exists raised OSError (File name too long) from the middle of the load.
    settings = {"source": str(tiny_path), **settings}
    with pytest.raises(wb.ModelLoadError, match=r"is neither a local directory nor a hub id: one part of it is "
                                                r"\d+ characters, and a file or folder name holds at most 255") as info:
        bench.load("m", **settings)
    assert len(str(info.value)) < 400  # the long part is not said back whole
    assert bench.models().empty


def test_a_blank_source_and_an_overlong_name_are_refused_as_such(bench: wb.Workbench, tiny_path: Path) -> None:
    # A blank source read as the working directory ("'' is not a model directory: it has no config.json"), and a
    # name of 10,000 characters loaded, to fill every table and span name.
    for source in ("", "   "):
        with pytest.raises(wb.ModelLoadError, match="the model's source is empty"):
            bench.load("m", source)
    with pytest.raises(wb.SettingsError, match="is 201 characters; a name has at most 200"):
        bench.load("m" * 201, tiny_path)
    assert bench.models().empty


def test_a_sharded_checkpoint_with_a_shard_missing_names_it(tiny_bench: wb.Workbench, tiny_path: Path,
                                                           tmp_path: Path) -> None:
    # The hint was to check the path or hub id, of a directory that is there.
    source = tmp_path / "sharded"
    tiny_bench.registry.get("tiny").model.save_pretrained(source, max_shard_size="200KB")
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_path / name, source / name)
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(wb.ModelLoadError, match=f"FileNotFoundError: .*{shards[-1].name}") as info:
        tiny_bench.load("sharded", source, device="cpu")
    assert "(model.safetensors.index.json) names is missing" in str(info.value.hint)
    assert sorted(tiny_bench.registry.names()) == ["tiny"]


def test_a_checkpoint_saved_without_its_tokenizer_says_so(tiny_bench: wb.Workbench, tiny_path: Path,
                                                         tmp_path: Path) -> None:
    # model.save_pretrained(dir) without tokenizer.save_pretrained(dir): the error was transformers' "Couldn't
    # instantiate the backend tokenizer" with the hint to check the path or hub id.
    source = tmp_path / "model-only"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_path / name, source / name)
    with pytest.raises(wb.ModelLoadError, match="could not load the tokenizer of .*model-only") as info:
        tiny_bench.load("model-only", source, device="cpu")
    assert "tokenizer.save_pretrained(DIR)" in str(info.value.hint)
    assert sorted(tiny_bench.registry.names()) == ["tiny"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error(tiny_bench: wb.Workbench, tiny_path: Path) -> None:
    with pytest.raises(wb.ModelLoadError, match="'cuda' is not available") as info:
        tiny_bench.load("gpu", tiny_path, device="cuda")
    assert "cpu" in str(info.value.hint)
    assert "gpu" not in tiny_bench.registry.names()


def test_forgetting_frees_the_model_and_later_use_fails_clearly(loaded: wb.Workbench) -> None:
    bench = loaded
    chain = bench.chain({"name": "c", "hops": [{"name": "say", "model": "tiny", "prompt": "Q: {{ q }}"}]})
    model_ref = weakref.ref(bench.registry.get("tiny").model)
    memory = bench.registry.get("tiny").memory_bytes

    assert bench.unload("tiny", forget=True) == memory
    assert model_ref() is None  # nothing keeps the weights alive
    assert bench.models().empty

    with pytest.raises(wb.HopFailed) as info:
        chain.run(q="hi")
    assert info.value.hop == "say"
    assert isinstance(info.value.cause, wb.UnknownModelError)
    assert "no model named 'tiny'" in str(info.value)
    for lookup in (bench.registry.get, bench.engine.worker, bench.unload):
        with pytest.raises(wb.UnknownModelError, match="no model named 'tiny'"):
            lookup("tiny")
    with pytest.raises(wb.SpecError, match="unknown model 'tiny'"):
        bench.chain({"name": "again", "hops": [{"name": "say", "model": "tiny", "prompt": "Q: {{ q }}"}]})


def test_loaded_objects_leave_full_collections_and_still_free_on_unload(tiny_path: Path, tmp_path: Path) -> None:
    with wb.Workbench(data_dir=tmp_path) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        model = bench.registry.get("tiny").model
        assert gc.get_freeze_count() > 0  # the model and everything alive at load are out of full collections
        # A reference cycle through the model: only the cycle collector can free it, and it skips frozen objects.
        model.cycle = {"model": model}
        model_ref = weakref.ref(model)
        del model
        bench.unload("tiny", forget=True)
        assert model_ref() is None  # unload thawed, collected and froze again
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0  # closing hands everything back to the collector


def test_freezing_can_be_turned_off(tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_GC_FREEZE", "0")
    gc.unfreeze()
    with wb.Workbench(data_dir=tmp_path) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        assert gc.get_freeze_count() == 0


def test_registered_model_validates_in_chains_and_loads_on_first_use(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.register("later", tiny_path, device="cpu")
    chain = bench.chain({"name": "c", "hops": [{"name": "say", "model": "later", "prompt": "Q: {{ q }}",
                                                "max_new_tokens": 3}]})
    assert bench.models().set_index("name").loc["later", "state"] == "registered"
    run = chain.run(q="hi")
    assert bench.models().set_index("name").loc["later", "state"] == "loaded"
    assert run.outputs["say"] == bench.generate("later", "Q: hi", max_new_tokens=3).text

    bench.unload("later")
    bench.load("later")  # explicitly, from the registered settings
    assert bench.models().set_index("name").loc["later", "state"] == "loaded"


def test_a_registration_with_a_device_or_dtype_a_load_would_refuse_keeps_the_one_before(
    bench: wb.Workbench, tiny_path: Path
) -> None:
    bench.register("later", tiny_path, device="cpu")
    for settings, said in (({"device": "cuda:99"}, "'cuda:99' is not available"),
                           ({"device": "gpu0"}, "unknown device"), ({"dtype": "bfloat17"}, "unknown dtype 'bfloat17'")):
        with pytest.raises(wb.ModelLoadError, match=said) as info:
            bench.register("later", tiny_path, **settings)
        assert info.value.hint
    assert bench.registry.settings("later") == LoadSettings(str(tiny_path), device="cpu")  # the good one stands
    assert bench.generate("later", PROMPT, max_new_tokens=2).tokens_out == 2


def test_a_misspelt_registration_setting_is_named_with_the_right_spelling(bench: wb.Workbench, tiny_path: Path) -> None:
    # It was a bare TypeError from LoadSettings.__init__.
    with pytest.raises(wb.SettingsError, match=r"register\(\) takes no setting 'devcie' \(did you mean 'device'\?\)"):
        bench.register("later", tiny_path, devcie="cpu")
    assert "later" not in bench.registry.names()


def test_an_unknown_load_setting_is_named_with_the_right_spelling(bench: wb.Workbench, tiny_path: Path) -> None:
    # It was Python's own "TypeError: Workbench.load() got an unexpected keyword argument 'max_memory'".
    with pytest.raises(wb.ModelLoadError) as info:
        bench.load("tiny", tiny_path, max_memory="1GiB")
    assert info.value.message == "load() takes no setting 'max_memory'"  # nothing near it to suggest
    assert info.value.hint is not None and "device, dtype" in info.value.hint
    with pytest.raises(wb.ModelLoadError, match=r"load\(\) takes no setting 'balanse' \(did you mean 'balance'\?\)"):
        bench.load("tiny", tiny_path, balanse="round_robin")
    assert "tiny" not in bench.registry.names()


# -- remote code -------------------------------------------------------------------------------


def _remote_code_dir(tmp_path: Path, tiny_path: Path, custom_type: bool) -> tuple[Path, Path]:
    """The tiny model plus repository code (auto_map) that writes a marker file when imported."""
    target, marker = tmp_path / "remote", tmp_path / "code-ran"
    shutil.copytree(tiny_path, target)
    (target / "modeling_marker.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('executed')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class MarkerConfig(LlamaConfig):\n"
        "    model_type = 'marker_llama'\n"
        "class MarkerForCausalLM(LlamaForCausalLM):\n"
        "    config_class = MarkerConfig\n"
    )
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "modeling_marker.MarkerConfig",
        "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM",
    }
    if custom_type:
        config.update(model_type="marker_llama", architectures=["MarkerForCausalLM"])
    (target / "config.json").write_text(json.dumps(config))
    return target, marker


def test_trust_remote_code_is_off_by_default() -> None:
    assert LoadSettings(source="x").trust_remote_code is False
    assert inspect.signature(wb.Workbench.load).parameters["trust_remote_code"].default is False


def test_repository_code_of_an_unknown_architecture_is_not_run(
    tiny_bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    source, marker = _remote_code_dir(tmp_path, tiny_path, custom_type=True)
    with pytest.raises(wb.ModelLoadError, match="custom code"):
        tiny_bench.load("remote", source, device="cpu")
    assert not marker.exists()
    assert "remote" not in tiny_bench.registry.names()


def test_repository_code_of_a_known_architecture_is_ignored(
    tiny_bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    source, marker = _remote_code_dir(tmp_path, tiny_path, custom_type=False)
    loaded = tiny_bench.load("remote", source, device="cpu")
    try:
        assert type(loaded.model).__name__ == "LlamaForCausalLM"  # the library's class, not the repository's
        assert not marker.exists()
    finally:
        tiny_bench.unload("remote", forget=True)


def test_refused_repository_code_says_how_to_opt_in(tiny_bench: wb.Workbench, tiny_path: Path, tmp_path: Path) -> None:
    source, marker = _remote_code_dir(tmp_path, tiny_path, custom_type=True)
    with pytest.raises(wb.ModelLoadError) as info:
        tiny_bench.load("remote", source, device="cpu")
    assert "trust_remote_code=True" in str(info.value.hint) and "trust its author" in str(info.value.hint)
    assert not marker.exists()


# -- Python hops -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        "os.system('touch {marker}')",
        "pathlib:Path('{marker}').touch",
        "__import__('pathlib').Path('{marker}').touch()",
        "exec(\"open('{marker}', 'w')\")",
        "lambda question: open('{marker}', 'w')",
        "workbench.demo:canned_answer; open('{marker}', 'w')",
    ],
)
def test_python_hops_are_imported_by_dotted_path_never_evaluated(
    tiny_bench: wb.Workbench, tmp_path: Path, call: str
) -> None:
    marker = tmp_path / "evaluated"
    spec = {"name": "py", "hops": [{"name": "step", "call": call.format(marker=marker)}]}
    for given in (spec, f"name: py\nhops:\n  - name: step\n    call: {json.dumps(spec['hops'][0]['call'])}\n"):
        with pytest.raises(wb.SpecError, match="is not a dotted path to a function") as info:
            tiny_bench.chain(given)
        assert info.value.hop == "step" and info.value.field == "call"
    assert not marker.exists()
    # A dotted path is imported, and only ever names a function.
    imported = tiny_bench.chain({"name": "py", "hops": [{"name": "step", "call": "workbench.demo:canned_answer"}]})
    assert imported.run(question="q").output == "(no model could answer 'q' just now)"


# -- adapters ----------------------------------------------------------------------------------


@pytest.fixture
def lora_dir(tiny_path: Path, tmp_path: Path) -> Path:
    """A real LoRA adapter for the tiny model whose B matrices are non-zero, so it changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    tuned = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    target = tmp_path / "adapter"
    tuned.save_pretrained(target)
    return target


def test_lora_adapter_loads_and_changes_outputs(tiny_bench: wb.Workbench, tiny_path: Path, lora_dir: Path) -> None:
    base_before = tiny_bench.generate("tiny", PROMPT, max_new_tokens=12)
    tiny_bench.load("tuned", tiny_path, adapter=lora_dir, device="cpu")
    try:
        row = tiny_bench.models().set_index("name").loc["tuned"]
        assert row["adapter"] == str(lora_dir)
        assert row["source"] == str(tiny_path)
        assert row["params"] > tiny_bench.registry.get("tiny").params  # the LoRA matrices are counted

        tuned = tiny_bench.generate("tuned", PROMPT, max_new_tokens=12)
        assert tuned.token_ids != base_before.token_ids
        # The base model loaded from the same directory is not affected by the adapter.
        assert tiny_bench.generate("tiny", PROMPT, max_new_tokens=12).token_ids == base_before.token_ids
    finally:
        tiny_bench.unload("tuned", forget=True)


def test_adapter_directory_without_adapter_config_is_refused(tiny_bench: wb.Workbench, tiny_path: Path,
                                                             tmp_path: Path) -> None:
    with pytest.raises(wb.ModelLoadError, match="not a PEFT adapter directory"):
        tiny_bench.load("tuned", tiny_path, adapter=tmp_path, device="cpu")
    with pytest.raises(wb.ModelLoadError, match=r"adapter '\./no-such-adapter' does not exist \(relative paths"):
        tiny_bench.load("tuned", tiny_path, adapter="./no-such-adapter", device="cpu")
    assert "tuned" not in tiny_bench.registry.names()


def test_an_adapter_for_another_base_model_is_named_as_what_failed(tiny_bench: wb.Workbench, tiny_path: Path,
                                                                   tmp_path: Path) -> None:
    """adapter= (one adapter, always on): a refusal names the adapter, not the model, and says what to do. The checks
    named adapters get refuse both before peft is asked."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"  # the tiny model's module names at half its hidden size
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)).save_pretrained(other)
    gpt2 = tmp_path / "gpt2-base"  # another architecture: its projections have other names
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512, n_positions=64)).save_pretrained(gpt2)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # peft sets it for GPT-2's Conv1D, and says so
        gpt2_lora = wb.tiny_lora(gpt2, tmp_path / "gpt2-lora", target_modules=("c_attn",))
    adapters = {wb.tiny_lora(other, tmp_path / "other-lora"): "another hidden size", gpt2_lora: "the base model lacks"}
    for adapter, cause in adapters.items():
        with pytest.raises(wb.AdapterError, match=f"adapter {re.escape(repr(str(adapter)))}.*{cause}") as info:
            tiny_bench.load("tuned", tiny_path, adapter=adapter, device="cpu")
        assert info.value.hint == "load it on the model it was trained on"
    assert "tuned" not in tiny_bench.registry.names()


def test_a_half_imported_transformers_is_named_as_the_cause_of_a_failed_load(tiny_path: Path) -> None:
    """An import of transformers' broken off (Ctrl-C during a first load) leaves its lazy modules failing every
    later load; the error says to restart, not to check the path. In a child process: the break is for good."""
    code = ("import sys, workbench as wb\n"
            "sys.modules['transformers.models.llama.configuration_llama'] = None  # as a broken-off import leaves it\n"
            "with wb.Workbench() as bench:\n"
            "    try:\n"
            f"        bench.load('m', {str(tiny_path)!r})\n"
            "    except wb.ModelLoadError as exc:\n"
            "        print(exc)\n")
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert "Could not import module 'LlamaConfig'" in said and "restart the kernel" in said, said


def test_closing_frees_every_model_with_one_full_collection(tiny_path: Path) -> None:
    """A full pass takes ~0.2 s with torch loaded: closing a workbench of 16 models spent 3.4 s collecting, one
    pass per model. Every model must still be freed."""
    full_passes: list[int] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            full_passes.append(1)

    bench = wb.Workbench(store=wb.InMemoryContextStore())
    try:
        for name in ("a", "b", "c", "d"):
            bench.load(name, tiny_path, device="cpu")
        refs = [weakref.ref(bench.registry.get(name).model) for name in ("a", "b", "c", "d")]
    except BaseException:
        bench.close()
        raise
    gc.callbacks.append(count)
    try:
        bench.close()
    finally:
        gc.callbacks.remove(count)
    assert all(ref() is None for ref in refs)
    assert 1 <= len(full_passes) <= 2, full_passes  # one, or one more the allocator asked for; it was 4
