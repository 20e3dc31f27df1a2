"""Chat hops (``messages:``): the spec's checks, the in-process model's chat template, and a real `transformers serve`
answering ``/v1/chat/completions`` on a copy of the tiny model given a chat template."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import workbench as wb
from tests.helpers import transformers_serve
from workbench.chains.spec import parse_spec
from workbench.errors import ChatTemplateError, HopFailed, ModelError, SpecError, TemplateError
from workbench.tracing import attributes as attr

# The tiny model's tokenizer has no chat template, and `transformers serve` answers a chat for it with HTTP 500;
# the tests give a copy of it this one.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
QUESTIONS = ["What is the capital of France?", "What is the sea?", "Why?"]

CHAT = """\
name: chat
hops:
  - name: answer
    model: {model}
    messages:
      - {{role: system, content: "You answer briefly."}}
      - {{role: user, content: "{{{{ question }}}}"}}
    max_new_tokens: 12
"""


def _spec(hop: str) -> str:
    return f"name: c\nhops:\n  - name: answer\n    model: m\n{hop}"


# -- the spec ------------------------------------------------------------------------------------


def test_a_chat_hop_reads_its_inputs_and_hops_from_every_message() -> None:
    spec = parse_spec({"name": "c", "hops": [
        {"name": "plan", "model": "m", "prompt": "Plan for {{ question }}:"},
        {"name": "answer", "model": "m", "messages": [
            {"role": "system", "content": "You follow {{ plan }}."},
            {"role": "user", "content": "{{ question }} ({{ style }})"},
        ]},
    ]})
    answer = spec.hop("answer")
    assert answer.deps == ("plan",)
    assert answer.inputs == {"question", "style"}
    assert spec.inputs == ("question", "style")
    assert answer.prompt is None and answer.text_field == "messages"
    assert [role for role, _ in answer.messages or ()] == ["system", "user"]


@pytest.mark.parametrize(("hop", "field", "line", "words"), [
    ('    prompt: "{{ q }}"\n    messages: [{role: user, content: "{{ q }}"}]\n', "messages", 6,
     "'prompt' or 'messages', not both"),
    ("    max_new_tokens: 4\n", "prompt", 3, "needs 'prompt', a template string, or 'messages'"),
    ("    messages: []\n", "messages", 5, "non-empty list"),
    ("    messages: hello\n", "messages", 5, "non-empty list"),
    ("    messages:\n      - hello\n", "messages[0]", 6, "must be a mapping with role and content"),
    ('    messages:\n      - {role: user, content: "a"}\n      - {role: bot, content: "b"}\n', "messages[1].role", 7,
     "needs a role: system, user, assistant; got 'bot'"),
    ("    messages:\n      - {role: usr, content: hi}\n", "messages[0].role", 6, "(did you mean 'user'?)"),
    ("    messages:\n      - {role: user}\n", "messages[0].content", 6, "needs 'content', a template string"),
    ("    messages:\n      - {role: user, content: 3}\n", "messages[0].content", 6, "got 3"),
    ("    messages:\n      - {role: user, content: hi, name: bob}\n", "name", 6, "unknown field 'name'"),
    ('    messages:\n      - {role: user, content: "{{ q }"}\n', "messages[0].content", 6, "does not parse"),
    ('    messages: [{role: user, content: "{{ q }}"}]\n    truncate: left\n', "truncate", 6,
     "a chat's messages cannot be cut"),
])
def test_a_malformed_chat_hop_is_refused_naming_hop_field_and_line(hop: str, field: str, line: int, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(_spec(hop))
    error = caught.value
    assert (error.hop, error.field, error.line) == ("answer", field, line)
    assert words in error.message


def test_a_message_reading_an_undeclared_name_is_refused_at_the_messages() -> None:
    hop = '    messages:\n      - {role: user, content: "{{ questoin }}"}\n'
    with pytest.raises(SpecError, match="did you mean 'question'") as caught:
        parse_spec(f"name: c\ninputs: [question]\nhops:\n  - name: answer\n    model: m\n{hop}")
    assert (caught.value.field, caught.value.line) == ("messages", 6)


# -- in process ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_path(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny model whose tokenizer has a chat template (saved as transformers saves one)."""
    path = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_path, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(chat_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with transformers_serve(chat_path, tmp_path_factory.mktemp("serve")) as url:
        yield url


@pytest.fixture(scope="module")
def chats(server: str, chat_path: Path, tiny_path: Path) -> Iterator[wb.Workbench]:
    """The chat copy served as 'remote' and in process as 'local'; the tiny model, without a template, as 'plain'."""
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("remote", server)
        bench.load("local", chat_path, device="cpu")
        bench.load("plain", tiny_path, device="cpu")
        yield bench


def _request_span(run: wb.Run) -> dict[str, object]:
    (span,) = [s for s in run.trace.spans if s.name.startswith("text_completion")]
    return dict(span.attributes or {})


def _hop_span(run: wb.Run, hop: str) -> dict[str, object]:
    (span,) = [s for s in run.trace.spans if s.name == f"hop {hop}"]
    return dict(span.attributes or {})


def test_a_local_chat_hop_sends_the_model_its_chat_template_s_prompt(chats: wb.Workbench, chat_path: Path) -> None:
    run = chats.chain(CHAT.format(model="local")).run(question=QUESTIONS[0])
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": QUESTIONS[0]}]
    tokenizer = AutoTokenizer.from_pretrained(chat_path)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = chats.generate("local", prompt, max_new_tokens=12).text
    assert run.output == expected != ""
    span = _request_span(run)
    assert span[attr.USAGE_INPUT_TOKENS] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert span[attr.OPERATION_NAME] == attr.CHAT
    assert json.loads(str(span[attr.INPUT_VALUE])) == messages
    assert span["llm.input_messages.1.message.role"] == "user"
    assert span["llm.input_messages.1.message.content"] == QUESTIONS[0]


def test_a_model_without_a_chat_template_fails_the_hop_saying_to_use_prompt(chats: wb.Workbench) -> None:
    with pytest.raises(HopFailed) as caught:
        chats.chain(CHAT.format(model="plain")).run(question=QUESTIONS[0])
    cause = caught.value.cause
    assert isinstance(cause, ChatTemplateError) and isinstance(cause, ModelError)
    assert "hop 'answer': model 'plain' has no chat template" in cause.message
    assert "prompt:" in (cause.hint or "")


def test_a_message_missing_a_value_at_run_time_names_its_field(chats: wb.Workbench) -> None:
    chain = chats.chain({"name": "c", "hops": [{"name": "answer", "model": "local", "messages": [
        {"role": "user", "content": "{{ question }}"}, {"role": "user", "content": "{{ extra.missing }}"}]}]})
    with pytest.raises(HopFailed) as caught:
        chain.run(question="q", extra={})
    cause = caught.value.cause
    assert isinstance(cause, TemplateError) and cause.field == "messages[1].content"


def test_a_long_chat_past_the_window_by_its_length_alone_is_refused_untokenized(
    chat_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plain prompt of millions of characters was refused by its length before tokenizing (seconds of Python's lock
    # for ten million); a chat's messages, rendered by the template, were tokenized whole first, only to be refused.
    from workbench.engine.engine import LONG_PROMPT_CHARS

    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("local", chat_path, device="cpu")
        backend = bench.engine.worker("local").backend
        tokenize, tokenized = backend.tokenize, []

        def watched(prompts: list[str], *args: object, **kwargs: object) -> list[list[int]]:
            tokenized.extend(len(p) for p in prompts if len(p) > LONG_PROMPT_CHARS)
            return tokenize(prompts, *args, **kwargs)  # type: ignore[no-any-return]

        monkeypatch.setattr(backend, "tokenize", watched)  # the real tokenizer, watched for the long prompts it gets
        question = "Where is the sea? " * (LONG_PROMPT_CHARS // 8)
        chain = bench.chain(CHAT.format(model="local"))
        with pytest.raises(HopFailed) as caught:
            chain.run(question=question)
        cause = caught.value.cause
        assert isinstance(cause, wb.ContextWindowExceeded) and "hop 'answer'" in cause.message
        assert "characters, so at least" in cause.message and "context window of 512 tokens" in cause.message
        assert tokenized == []  # refused by length, never tokenized
        assert chain.run(question=QUESTIONS[0]).output  # a short chat still goes through


def test_a_long_chat_within_a_long_window_is_rendered_and_tokenized_off_the_loop(
    chat_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chat of tens of thousands of characters for a model with a long window was rendered and tokenized on the
    workbench's loop, where no other chain moved meanwhile."""
    from workbench.engine.engine import LONG_PROMPT_CHARS

    path = tmp_path / "tiny-chat-16k"
    shutil.copytree(chat_path, path)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        settings = json.loads((path / name).read_text())
        settings[key] = 16384
        (path / name).write_text(json.dumps(settings))
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("long", path, device="cpu")
        backend = bench.engine.worker("long").backend
        assert backend.context_window == 16384
        tokenize, where = backend.tokenize, []

        def watched(prompts: list[str], special_tokens: bool = True) -> list[list[int]]:
            if any(len(p) > LONG_PROMPT_CHARS for p in prompts):
                where.append((threading.current_thread().name, special_tokens))
            return tokenize(prompts, special_tokens)  # type: ignore[no-any-return]

        monkeypatch.setattr(backend, "tokenize", watched)  # the real tokenizer, watched for the long prompts it gets
        question = "Where is the sea? " * (LONG_PROMPT_CHARS // 16)
        run = bench.chain(CHAT.format(model="long")).run(question=question)
        assert run.ok, run.error
        assert len(where) == 1 and where[0][0] != "workbench-loop" and where[0][1] is False  # the template's text
        rendered = backend.chat_prompt([{"role": "system", "content": "You answer briefly."},
                                        {"role": "user", "content": question}])
        call = run.trace.table().query("name == 'text_completion long'").iloc[0]
        assert call["tokens_in"] == len(tokenize([rendered], False)[0])


def test_a_model_in_a_child_process_takes_a_chat_as_in_process(chats: wb.Workbench, chat_path: Path) -> None:
    pytest.importorskip("msgpack", reason="isolation='process' needs the process extra (pip install -e '.[dev]')")
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("local", chat_path, device="cpu", isolation="process")
        isolated = bench.chain(CHAT.format(model="local"))
        local = chats.chain(CHAT.format(model="local"))
        for question in QUESTIONS[:2]:
            assert isolated.run(question=question).output == local.run(question=question).output


# -- on a server ---------------------------------------------------------------------------------


def test_a_served_chat_writes_the_same_greedy_text_as_the_local_one(chats: wb.Workbench) -> None:
    served, local = chats.chain(CHAT.format(model="remote")), chats.chain(CHAT.format(model="local"))
    for question in QUESTIONS:
        assert served.run(question=question).output == local.run(question=question).output


def test_a_served_chat_streams_its_tokens_through_chain_stream(chats: wb.Workbench) -> None:
    events = list(chats.chain(CHAT.format(model="remote")).stream(question=QUESTIONS[1]))
    tokens = [e.text for e in events if e.kind == "token"]
    (finished,) = [e for e in events if e.kind == "run_finished"]
    assert len(tokens) > 1
    assert "".join(tokens).strip() == finished.run.output != ""


def test_a_served_chat_posts_to_chat_completions_and_records_its_messages(chats: wb.Workbench) -> None:
    chain = chats.chain({"name": "c", "hops": [
        {"name": "plan", "model": "remote", "prompt": "Plan for {{ question }}:", "max_new_tokens": 4},
        {"name": "answer", "model": "remote", "max_new_tokens": 8, "messages": [
            {"role": "system", "content": "Follow the plan: {{ plan }}"},
            {"role": "user", "content": "{{ question }}"}]},
    ]})
    run = chain.run(question=QUESTIONS[0])
    plan, answer = (dict(s.attributes or {}) for s in run.trace.spans if s.name.startswith("text_completion"))
    assert plan[attr.REMOTE_ENDPOINT] == "/completions" and plan[attr.OPERATION_NAME] == attr.TEXT_COMPLETION
    assert answer[attr.REMOTE_ENDPOINT] == "/chat/completions" and answer[attr.OPERATION_NAME] == attr.CHAT
    assert str(answer[attr.REMOTE_URL]).endswith("/v1/chat/completions")
    messages = [{"role": "system", "content": f"Follow the plan: {run.outputs['plan']}"},
                {"role": "user", "content": QUESTIONS[0]}]
    assert json.loads(str(_hop_span(run, "answer")[attr.INPUT_VALUE])) == messages
    assert _hop_span(run, "answer")[attr.INPUT_MIME_TYPE] == attr.MIME_JSON
    # The server's own count of the prompt its template made is the count made here by the same template.
    assert answer[attr.REMOTE_TOKENS_FROM] == "server"
    local = chats.chain({"name": "l", "hops": [{"name": "answer", "model": "local", "messages": messages}]}).run()
    assert answer[attr.USAGE_INPUT_TOKENS] == _request_span(local)[attr.USAGE_INPUT_TOKENS]
    ttft, e2e = answer[attr.REMOTE_TTFT_MS], answer[attr.REMOTE_E2E_MS]
    assert 0 < ttft <= e2e  # type: ignore[operator]
