"""A chain spec cannot hurt whoever runs it: no calls into modules they did not open, no bombs, bounded templates."""

from __future__ import annotations

import json
import re
import sys
import threading
from pathlib import Path
from textwrap import dedent
from typing import Any

import httpx
import pytest
from helpers import WAIT_S

import workbench as wb
from workbench.chains.templates import PromptTemplate
from workbench.fronts.cli import main


def _python_hop(call: Any) -> dict[str, Any]:
    return {"name": "py", "hops": [{"name": "step", "call": call}]}


@pytest.fixture
def own_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of the user's own modules on sys.path, as a project directory or PYTHONPATH entry is."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "myhops.py").write_text(dedent("""\
        from os import system


        def shout(question):
            return question.upper()
    """))
    (folder / "broken_syntax.py").write_text("def shout(question:\n    return question\n")
    (folder / "raises_on_import.py").write_text("raise RuntimeError('no database configured')\n")
    monkeypatch.syspath_prepend(str(folder))
    for name in ("myhops", "broken_syntax", "raises_on_import"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return folder


# -- which modules a spec may call into ---------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        ("os:system", "standard library"),
        ("subprocess:getoutput", "standard library"),
        ("builtins:open", "standard library"),
        ("shutil:rmtree", "standard library"),
        ("importlib:import_module", "standard library"),
        ("numpy:save", "an installed package"),
        ("workbench.bench:current", "part of the workbench itself"),
    ],
)
def test_a_spec_cannot_call_into_the_standard_library_or_installed_packages(
    tiny_bench: wb.Workbench, call: str, reason: str
) -> None:
    for spec in (_python_hop(call), f"name: py\nhops:\n  - name: step\n    call: {call}\n"):
        with pytest.raises(wb.SpecError, match=reason) as info:
            tiny_bench.chain(spec)
        assert info.value.hop == "step" and info.value.field == "call"
        assert f"bench.allow_modules({call.split(':')[0].split('.')[0]!r})" in str(info.value.hint)
        assert isinstance(spec, dict) or info.value.line == 4


def test_a_refused_module_is_not_even_imported(tiny_bench: wb.Workbench, capsys: pytest.CaptureFixture[str]) -> None:
    # Importing 'this' prints the Zen of Python: a side effect anyone would see.
    was_imported = "this" in sys.modules
    with pytest.raises(wb.SpecError, match="standard library"):
        tiny_bench.chain(_python_hop("this:s"))
    assert ("this" in sys.modules) == was_imported
    assert "Beautiful is better than ugly" not in capsys.readouterr().out


def test_your_own_modules_the_notebook_and_passed_functions_work_as_before(
    tiny_bench: wb.Workbench, own_modules: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tiny_bench.chain(_python_hop("myhops:shout")).run(question="hi").output == "HI"
    # A function defined in the notebook lives in __main__.
    monkeypatch.setattr(sys.modules["__main__"], "whisper", lambda question: question.lower(), raising=False)
    assert tiny_bench.chain(_python_hop("__main__:whisper")).run(question="HI").output == "hi"
    # A function object in a dict spec is the user's own choice, wherever it comes from.
    assert tiny_bench.chain(_python_hop(len)).run().output == 2  # the whole context: history and session
    demo = tiny_bench.chain(_python_hop("workbench.demo:canned_answer"))
    assert demo.run(question="q").output.startswith("(no model")


def test_a_function_imported_into_your_module_is_judged_by_where_it_comes_from(
    tiny_bench: wb.Workbench, own_modules: Path, tmp_path: Path
) -> None:
    with pytest.raises(wb.SpecError, match="imported into 'myhops'") as info:
        tiny_bench.chain(_python_hop("myhops:system"))
    assert "standard library" in str(info.value)


def test_allowing_your_module_does_not_open_what_it_imports(own_modules: Path, tmp_path: Path) -> None:
    # A server must list its own modules (autoglm serve --allow-module myhops) for a client's spec to call them; that
    # list skipped the check above, so an admin's POST /v1/chains with 'call: myhops:system' ran shell commands.
    with wb.Workbench(data_dir=tmp_path, allow_modules=["myhops"]) as bench:
        assert bench.chain(_python_hop("myhops:shout")).run(question="hi").output == "HI"
        with pytest.raises(wb.SpecError, match="imported into 'myhops'"):
            bench.chain(_python_hop("myhops:system"))
        with bench.serve(port=0, auth=False) as server:
            for call, status in (("myhops:shout", 201), ("myhops:system", 422)):
                spec = f"name: c{status}\nhops:\n  - name: x\n    call: {call}\n"
                made = httpx.post(server.url + "/v1/chains", json={"spec": spec}, timeout=60)
                assert made.status_code == status, made.text
            assert httpx.post(server.url + "/v1/chains/c201/invoke", json={"inputs": {"question": "hi"}},
                              timeout=60).json()["output"] == "HI"


class _Shout:
    def __call__(self, question: str) -> str:
        return question.upper()


def test_a_callable_object_is_judged_by_the_code_a_call_runs(
    tiny_bench: wb.Workbench, monkeypatch: pytest.MonkeyPatch
) -> None:
    # IPython puts exit in the notebook's namespace as an ExitAutocall object: 'call: "__main__:exit"' was taken as the
    # notebook's own, and a run of the chain shut the kernel down. An object is judged by its class, a partial by its
    # function.
    import functools
    import os

    from IPython.core.autocall import ExitAutocall

    main_module = sys.modules["__main__"]
    monkeypatch.setattr(main_module, "leave", ExitAutocall(), raising=False)
    monkeypatch.setattr(main_module, "run_shell", functools.partial(os.system, "true"), raising=False)
    monkeypatch.setattr(main_module, "shout", _Shout(), raising=False)
    monkeypatch.setattr(main_module, "shout_later", functools.partial(_Shout()), raising=False)
    for call, words in (("__main__:leave", "comes from module 'IPython.core.autocall' (imported into '__main__'), "
                                           "and it is an installed package"),
                        ("__main__:run_shell", "and it is part of Python's standard library")):
        with pytest.raises(wb.SpecError, match=re.escape(words)):
            tiny_bench.chain(_python_hop(call))
    for call in ("__main__:shout", "__main__:shout_later"):  # the user's own code, in an object
        assert tiny_bench.chain(_python_hop(call)).run(question="hi").output == "HI"


def test_a_folder_named_like_an_installed_namespace_package_does_not_open_it(
    tiny_bench: wb.Workbench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # google is a namespace package (protobuf installs google.protobuf): an empty google/ folder on the path made its
    # first location the user's own, and google.protobuf's functions callable from any spec.
    (tmp_path / "google").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(wb.SpecError, match="an installed package"):
        tiny_bench.chain(_python_hop("google.protobuf.text_format:Parse"))


def test_allowed_modules_open_a_package_and_its_submodules(tiny_path: Path, tmp_path: Path) -> None:
    with wb.Workbench(data_dir=tmp_path, allow_modules=["json"]) as bench:
        assert bench.chain(_python_hop("json.decoder:JSONDecoder")).hops == ["step"]
        with pytest.raises(wb.SpecError, match="'gc:collect' is in module 'gc'"):
            bench.chain(_python_hop("gc:collect"))
        assert bench.allow_modules("gc") == ("json", "gc")
        assert isinstance(bench.chain(_python_hop("gc:collect")).run().output, int)
        with pytest.raises(wb.WorkbenchError, match="'os system' is not a module name"):
            bench.allow_modules("os system")


def test_the_command_line_allows_a_module_only_when_told(
    tmp_path: Path, tiny_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "collect.yaml"
    spec.write_text("name: collect\nhops:\n  - name: sweep\n    call: gc:collect\n", encoding="utf-8")
    assert main(["run", str(spec), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoglm: chain spec, hop 'sweep', field 'call', line 4:") and "--allow-module gc" in err
    assert main(["run", str(spec), "--json", "--allow-module", "gc"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["output"], int)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("broken_syntax:shout", "importing module 'broken_syntax' failed: SyntaxError"),
        ("raises_on_import:shout", "importing module 'raises_on_import' failed: RuntimeError: no database configured"),
    ],
)
def test_a_hop_module_that_fails_to_import_is_a_spec_error(
    tiny_bench: wb.Workbench, own_modules: Path, call: str, message: str
) -> None:
    with pytest.raises(wb.SpecError, match=message) as info:
        tiny_bench.chain(_python_hop(call))
    assert info.value.hop == "step" and info.value.field == "call"
    assert tiny_bench.chain(_python_hop("myhops:shout")).run(question="ok").output == "OK"  # nothing else broke


# -- specs that would take the loader's memory -------------------------------------------------

# Nine levels of nine: a few hundred bytes that stand for 9**9 (387 million) values.
_ANCHORS = "description: [&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol], " + ", ".join(
    f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)
) + "]\n"


@pytest.mark.parametrize(
    "where",
    [
        "description: *a8\n",
        "hops:\n  - {name: h, model: tiny, prompt: hi, max_new_tokens: *a8}\n",
        "hops:\n  - {name: *a8, model: tiny, prompt: hi}\n",
        "hops:\n  - {name: h, model: tiny, prompt: hi, fallback: *a8}\n",
        "output: *a8\n",
    ],
    ids=["description", "max_new_tokens", "hop-name", "fallback", "output"],
)
def test_a_yaml_alias_bomb_is_refused(tiny_bench: wb.Workbench, where: str) -> None:
    head = "name: bomb\n" + (_ANCHORS if where.startswith("description") else _ANCHORS.replace("description", "x"))
    text = head + ("" if where.startswith("hops") else "hops:\n  - {name: h, model: tiny, prompt: hi}\n") + where
    with pytest.raises(wb.SpecError, match=r"aliases \(\*name\) expand to more than 100,000 values") as info:
        tiny_bench.chain(text)
    assert info.value.line == 2


def test_shared_or_deep_nests_in_a_dict_spec_give_short_errors(tiny_bench: wb.Workbench) -> None:
    shared: list[Any] = ["lol"] * 9
    for _ in range(9):
        shared = [shared] * 9
    deep: list[Any] = []
    for _ in range(200_000):
        deep = [deep]
    for nest in (shared, deep):
        for field, spec in [
            ("description", {"name": "x", "description": nest,
                             "hops": [{"name": "h", "model": "tiny", "prompt": "hi"}]}),
            ("max_new_tokens", {"name": "x", "hops": [{"name": "h", "model": "tiny", "prompt": "hi",
                                                        "max_new_tokens": nest}]}),
            ("output", {"name": "x", "hops": [{"name": "h", "model": "tiny", "prompt": "hi"}], "output": nest}),
        ]:
            with pytest.raises(wb.SpecError) as info:
                tiny_bench.chain(spec)
            assert info.value.field == field and len(str(info.value)) < 400


# -- templates ----------------------------------------------------------------------------------


def _llm_chain(bench: wb.Workbench, prompt: str, **hop: Any) -> wb.Chain:
    return bench.chain({"name": "t", "inputs": ["question"],
                        "hops": [{"name": "ask", "model": "tiny", "prompt": prompt, "max_new_tokens": 2, **hop}]})


def test_a_template_that_loops_for_ever_stops_at_the_hops_timeout(tiny_bench: wb.Workbench) -> None:
    chain = _llm_chain(tiny_bench, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                   "{% endfor %}{{ question }}", timeout_s=1)
    with pytest.raises(wb.HopFailed) as info:
        chain.run(question="q")
    assert info.value.hop == "ask" and isinstance(info.value.cause, wb.TemplateError)
    assert "the prompt template ran longer than its 1 s" in str(info.value)
    assert "timeout_s" in str(info.value.hint)
    assert _llm_chain(tiny_bench, "Q: {% if question %}{{ question }}{% endif %}").run(question="q").ok


@pytest.mark.parametrize(
    "prompt",
    [
        "{{ 'x' * 10**8 }}",
        "{{ question|center(10**9) }}",
        "{{ question.ljust(10**9) }}",
        "{{ '%1000000000s'|format(question) }}",
        "{{ '{:>1000000000}'.format(question) }}",
        "{{ range(100000)|join('x' * 1000000) }}",
        "{% set ns = namespace(s=question) %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set s = question * 1000 %}" + "{% set s = s ~ s ~ s ~ s %}" * 12 + "{{ s|length }}",
        "{% set block %}{% for i in range(100000) %}{{ question * 1000 }}{% endfor %}{% endset %}{{ block|length }}",
        "{% for i in range(100000) %}{{ question * 1000 }}{% endfor %}",
    ],
    ids=["repeat", "center", "ljust", "format", "str-format", "join", "doubling", "tilde", "set-block", "output"],
)
def test_a_template_cannot_make_more_than_ten_million_characters(tiny_bench: wb.Workbench, prompt: str) -> None:
    with pytest.raises(wb.HopFailed) as info:
        _llm_chain(tiny_bench, prompt).run(question="q")
    assert isinstance(info.value.cause, wb.TemplateError) and info.value.cause.hop == "ask"
    assert "10,000,000 characters" in str(info.value)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("{{ 2 ** (10**8) }}", "an integer of more than 100,000 bits"),
        ("{{ range(3)|batch(10**9, question)|list }}", "past the 100,000 items"),
        ("{% macro again() %}{{ again() }}{% endmacro %}{{ again() }}", "recurses too deeply"),
        ("{{ question|int / 0 }}", "rendering the prompt failed: ZeroDivisionError"),
    ],
)
def test_other_runaway_templates_are_template_errors(tiny_bench: wb.Workbench, prompt: str, message: str) -> None:
    with pytest.raises(wb.HopFailed, match=message) as info:
        _llm_chain(tiny_bench, prompt).run(question="7")
    assert isinstance(info.value.cause, wb.TemplateError)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("{% set l = [question] %}{% for i in range(40) %}{{ l.extend(l) or '' }}{% endfor %}",
         "attribute 'extend' of 'list' object is unsafe"),
        ("{% set d = {} %}{% for i in range(10**5) %}{{ d.update({i: question * 10**6}) or '' }}{% endfor %}",
         "attribute 'update' of 'dict' object is unsafe"),
        ("{{ question.encode() * 10**11 }}", "10,000,000 characters"),
        ("{{ question.encode().center(10**11) }}", "10,000,000 characters"),
        ("{{ (0).to_bytes(10**11, 'big') }}", "10,000,000 characters"),
        ("{{ (question * 10**5).translate({113: 'q' * 10**5}) }}", "10,000,000 characters"),
        ("{{ range(10**5)|list|tojson(10**6) }}", "tojson indents by at most 64"),
        ("{{ lipsum(10**7) }}", "past the 1,000,000 a template may make"),
        ("{{ ('<' * 10**6)|forceescape|forceescape|forceescape|forceescape|forceescape|forceescape }}",
         "10,000,000 characters"),
    ],
    ids=["list-extend", "dict-update", "bytes-repeat", "bytes-center", "to-bytes", "translate", "tojson-indent",
         "lipsum", "chained-escape"],
)
def test_templates_that_would_fill_memory_in_one_step_are_refused_before_they_do(
        tiny_bench: wb.Workbench, prompt: str, message: str) -> None:
    with pytest.raises(wb.HopFailed, match=message) as info:
        _llm_chain(tiny_bench, prompt).run(question="q")
    assert isinstance(info.value.cause, wb.TemplateError) and info.value.cause.hop == "ask"
    ok = _llm_chain(tiny_bench, "{{ [question, 'b']|tojson(2) }} {{ lipsum(1, html=False)|length > 0 }} "
                                "{{ question.encode()|length }} {{ 'abc'.translate({97: 'AA'}) }}")
    assert ok.run(question="q").ok


@pytest.mark.parametrize(
    "prompt",
    [
        "{% set xs = range(100000)|list %}{{ [xs] * 100000 }}",
        "{% set xs = range(100000)|list %}{{ ([xs] * 100000)|string|length }}",
        "{% set xs = range(100000)|list %}{{ ([xs] * 100000)|tojson|length }}",
        "{% set xs = range(100000)|list %}{{ ([xs] * 100000)|join|length }}",
        "{% set xs = range(100000)|list %}{{ question ~ [xs] * 100000 }}",
        "{% set xs = range(100000)|list %}{{ '%s' % ([xs] * 100000,) }}",
        "{% set xs = range(100000)|list %}{{ '{}'.format([xs] * 100000) }}",
        "{% set a = [question] %}" + "{% set a = [a, a] %}" * 40 + "{{ a }}",
        "{% set a = {'k': question} %}" + "{% set a = {'x': a, 'y': a} %}" * 40 + "{{ a|pprint }}",
        "{% set ns = namespace(xs=range(100000)|list) %}{{ [ns] * 100000 }}",
    ],
    ids=["output", "string", "tojson", "join", "tilde", "percent", "str-format", "doubling-list", "doubling-dict",
         "namespace"],
)
def test_a_list_that_holds_another_many_times_is_refused_before_it_becomes_text(
        tiny_bench: wb.Workbench, prompt: str) -> None:
    # A few kilobytes of lists whose text would be tens of gigabytes: str() of them is one C call no clock stops.
    with pytest.raises(wb.HopFailed, match="holds another many times over") as info:
        _llm_chain(tiny_bench, prompt).run(question="q")
    assert isinstance(info.value.cause, wb.TemplateError)
    ok = _llm_chain(tiny_bench, "{% set a = [question] %}{% set a = [a, a] %}{{ a }} {{ ([a] * 1000)|length }}")
    assert ok.run(question="q").ok


def test_what_a_render_makes_in_all_is_bounded(tiny_bench: wb.Workbench) -> None:
    # Each item is within the bounds; 100,000 of them, kept in one list, would be a terabyte.
    with pytest.raises(wb.HopFailed, match="made more than 200,000,000 characters and items in all") as info:
        _llm_chain(tiny_bench, "{{ range(100000)|map('string')|map('center', 10**7)|list|length }}").run(question="q")
    assert isinstance(info.value.cause, wb.TemplateError)
    # The count starts afresh with each render.
    chain = _llm_chain(tiny_bench, "{{ range(10)|map('string')|map('center', 10**7)|list|length }}{{ question }}")
    assert all(chain.run(question="q").ok for _ in range(30))


@pytest.mark.parametrize(
    "prompt",
    ["{{ " + "(" * 5000 + "question" + ")" * 5000 + " }}",
     "{{ question" + "|string" * 5000 + " }}",
     "{% for i in [1] %}" * 25 + "{{ question }}" + "{% endfor %}" * 25],
    ids=["brackets", "filters", "blocks"],
)
def test_a_template_nested_too_deeply_to_compile_is_a_spec_error(tiny_bench: wb.Workbench, prompt: str) -> None:
    spec = {"name": "deep", "hops": [{"name": "ask", "model": "tiny", "prompt": prompt}]}
    with pytest.raises(wb.TemplateError, match="nests too deeply to compile") as info:
        tiny_bench.chain(spec)
    assert (info.value.hop, info.value.field) == ("ask", "prompt")
    assert _llm_chain(tiny_bench, "{% for i in [1] %}" * 3 + "{{ question }}" + "{% endfor %}" * 3).run(question="q").ok


def test_loops_and_joins_render_as_jinja_renders_them(tiny_bench: wb.Workbench) -> None:
    prompt = ("{% for x in items %}{{ loop.index }}/{{ loop.length }}={{ x ~ '!' }} {% else %}none{% endfor %}"
              "|{{ items|join(',') }}|{{ 'ab'|center(6) }}|{{ '%3d'|format(7) }}")
    template = PromptTemplate(prompt, hop="h")
    assert template.render({"items": ["a", "b"]}) == "1/2=a! 2/2=b! |a,b|  ab  |  7"
    assert template.render({"items": []}) == "none||  ab  |  7"


# -- adapters -----------------------------------------------------------------------------------


def test_a_lora_adapter_with_only_pickle_weights_is_refused_unless_allowed(
    tiny_bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "pickled-adapter"
    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), LoraConfig(r=4, target_modules=["q_proj"]))
    tuned.save_pretrained(adapter, safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file()
    with pytest.raises(wb.ModelLoadError, match="adapter .* has only pickle weights") as info:
        tiny_bench.load("tuned", tiny_path, adapter=adapter, device="cpu")
    assert "allow_pickle=True" in str(info.value.hint)
    assert "tuned" not in tiny_bench.registry.names()
    tiny_bench.load("tuned", tiny_path, adapter=adapter, device="cpu", allow_pickle=True)
    try:
        assert tiny_bench.generate("tuned", "Hello", max_new_tokens=2).tokens_out == 2
    finally:
        tiny_bench.unload("tuned", forget=True)


def test_a_hub_adapter_with_only_pickle_weights_is_refused_unless_allowed(
    tiny_bench: wb.Workbench, tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hub id, not a folder, went to peft unchecked, and peft torch.load-ed its adapter_model.bin.
    from huggingface_hub import constants

    from workbench.models.tiny import tiny_lora

    for repo, safe in (("org--pickled", False), ("org--safe", True)):  # a hub cache as a download leaves it
        root = tmp_path / "hub" / f"models--{repo}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("0" * 40)
        tiny_lora(tiny_path, root / "snapshots" / ("0" * 40), seed=1, safe=safe)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(wb.ModelLoadError, match="adapter 'org/pickled' has no adapter_model.safetensors") as info:
        tiny_bench.load("hub", tiny_path, adapter="org/pickled", device="cpu")
    assert "allow_pickle=True" in str(info.value.hint) and "hub" not in tiny_bench.registry.names()
    for adapter, allow_pickle in (("org/safe", False), ("org/pickled", True)):
        tiny_bench.load("hub", tiny_path, adapter=adapter, device="cpu", allow_pickle=allow_pickle)
        try:
            assert tiny_bench.generate("hub", "Hello", max_new_tokens=2).tokens_out == 2
        finally:
            tiny_bench.unload("hub", forget=True)


def test_a_slow_template_does_not_hold_up_other_runs(tiny_path: Path, tmp_path: Path) -> None:
    class Gate:
        """Blocks the template that calls it until the test lets it go; says whether it was let go or gave up."""

        def __init__(self) -> None:
            self.entered, self.released = threading.Event(), threading.Event()
            self.outcome = ""

        def wait(self) -> str:
            self.entered.set()
            self.outcome = "released" if self.released.wait(WAIT_S) else "gave up"
            return self.outcome

    gate = Gate()
    with wb.Workbench(data_dir=tmp_path) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        slow = bench.chain({"name": "slow", "hops": [{"name": "ask", "model": "tiny", "max_new_tokens": 2,
                                                      "prompt": "{{ gate.wait() }}: {{ question }}"}]})
        quick = _llm_chain(bench, "Q: {{ question }}")
        slow_runs: list[wb.Run] = []
        runner = threading.Thread(target=lambda: slow_runs.append(slow.run(question="q", gate=gate)))
        runner.start()
        assert gate.entered.wait(WAIT_S)
        # Were the slow template rendering on the loop every run walks on, this run would wait for the gate.
        assert quick.run(question="hi").ok
        gate.released.set()
        runner.join(WAIT_S)
    assert gate.outcome == "released" and slow_runs[0].ok
