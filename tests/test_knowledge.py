"""Knowledge hops: entity linking, k-hop facts, the countries demo graph, the user's CSV/JSON triples, spec errors,
and a knowledge -> LLM chain on the tiny model with its span attributes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

import workbench as wb
from workbench.knowledge import GraphStore, files, load_file, resolve
from workbench.tracing import attributes as attr

GEO_SPEC = """\
name: geo
hops:
  - name: facts
    kind: knowledge
    graph: countries
    query: "{{ question }}"
    hops: 1
  - name: answer
    model: tiny
    prompt: "Facts:\\n{{ facts }}\\nQuestion: {{ question }}\\nAnswer:"
    max_new_tokens: 6
"""

CSV_TRIPLES = """\
subject,relation,object
Ada Lovelace,field,mathematics
Ada Lovelace,wrote notes on,Analytical Engine
Charles Babbage,designed,Analytical Engine
Ada Lovelace,alias,Countess of Lovelace
Charles Babbage,code,CB
"""


@pytest.fixture(scope="module")
def countries() -> wb.KnowledgeGraph:
    return GraphStore().get(resolve("countries"))


def knowledge_spec(graph: str, **fields: object) -> dict[str, object]:
    hop = {"name": "facts", "kind": "knowledge", "graph": graph, "query": "{{ question }}", **fields}
    return {"name": "kg", "hops": [hop]}


# -- linking -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["France", "FRANCE", "france", "the French Republic", "République française",
                                  "a French wine", "FR", "FRA"])
def test_names_aliases_demonyms_and_codes_link_france(countries: wb.KnowledgeGraph, text: str) -> None:
    assert countries.link(f"What about {text}?") == ["France"]


def test_codes_match_only_as_written_so_small_words_stay_words(countries: wb.KnowledgeGraph) -> None:
    assert countries.link("tell us what is in it, or no") == []
    assert countries.link("Is the US in NATO?") == ["United States"]


def test_the_longest_alias_wins_and_accents_do_not_matter(countries: wb.KnowledgeGraph) -> None:
    assert countries.link("Papua New Guinea and Guinea") == ["Papua New Guinea", "Guinea"]
    assert countries.link("flights from Bogota to Bogotá") == ["Bogotá"]
    assert countries.link("Paris or Berlin, France or Germany") == ["Paris", "Berlin", "France", "Germany"]


def test_names_of_many_words_link_like_short_ones() -> None:
    title = "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding"  # ten words
    graph = wb.KnowledgeGraph([(title, "introduced", "BERT"), ("Deep Learning", "is a", "field")],
                              aliases={"The Lord of the Rings: The Fellowship of the Ring, extended edition": title})
    assert graph.link(f"Who wrote '{title}'?") == [title]
    assert graph.link("the lord of the rings the fellowship of the ring extended edition") == [title]
    assert graph.link("BERT and deep learning") == ["BERT", "Deep Learning"]


def test_linking_a_long_query_holds_its_words_a_window_at_a_time(
    countries: wb.KnowledgeGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tracemalloc

    from workbench.knowledge import graph

    text = "flights from Port Moresby, Papua New Guinea, to Guinea via the Democratic Republic of the Congo"
    linked = countries.link(text)
    monkeypatch.setattr(graph, "_WINDOW", 2)  # names straddle every edge of the window as it slides
    assert countries.link(text) == linked
    assert linked == ["Port Moresby", "Papua New Guinea", "Guinea", "Democratic Republic of the Congo"]
    monkeypatch.undo()

    # One character NFKD makes 18 (U+FDFA, four Arabic words): 50,000 of them, 150 KB of a request's body,
    # held 70 MiB as a list of characters and two lists of words.
    query = "Peru " + "\ufdfa" * 50_000 + " and Chile"
    tracemalloc.start()
    try:
        entities = countries.link(query)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert entities == ["Peru", "Chile"]
    assert peak < 8 * 2**20  # the text NFKD made (1.8 MB), without its accents, and a window of words


# -- the countries graph and walking it ----------------------------------------------------------


def test_france_has_its_capital_neighbours_and_currency_one_hop_away(countries: wb.KnowledgeGraph) -> None:
    facts = countries.lookup("What is the capital of France?", hops=1).facts
    assert "France — capital — Paris." in facts.splitlines()
    neighbours = {t.object if t.subject == "France" else t.subject for t in facts.triples if t.relation == "borders"}
    assert {"Spain", "Germany", "Italy", "Belgium", "Switzerland"} <= neighbours
    assert ("France", "currency", "EUR") in facts.triples
    assert facts.entities == ("France",)
    assert all(line.endswith(".") and line.count(" — ") == 2 for line in facts.splitlines())


def test_two_hops_hold_one_hops_facts_and_more_nearest_first(countries: wb.KnowledgeGraph) -> None:
    one = countries.lookup("France", hops=1, max_triples=1000)
    two = countries.lookup("France", hops=2, max_triples=1000)
    assert not one.truncated and not two.truncated
    assert len(two.triples) > 3 * len(one.triples)
    assert two.triples[: len(one.triples)] == one.triples  # the walk goes out ring by ring
    assert ("Spain", "capital", "Madrid") in two.triples and ("Spain", "capital", "Madrid") not in one.triples


def test_max_triples_caps_a_walk_and_says_it_was_cut(countries: wb.KnowledgeGraph) -> None:
    lookup = countries.lookup("France and Germany", hops=3, max_triples=20)
    assert len(lookup.triples) == 20 and lookup.truncated
    assert len(set(lookup.triples)) == 20
    assert countries.lookup("nothing to see here", hops=4).triples == ()


def test_a_capped_walk_takes_every_entitys_facts_in_turn(countries: wb.KnowledgeGraph) -> None:
    # China alone has more than ten facts: Japan's must not be crowded out of a comparison.
    lookup = countries.lookup("Which is bigger, China or Japan?", hops=1, max_triples=10)
    assert lookup.truncated
    assert {t.subject for t in lookup.triples} == {"China", "Japan"}
    assert lookup.triples[:2] == (("China", "capital", "Beijing"), ("Japan", "capital", "Tokyo"))
    hub = wb.KnowledgeGraph([("hub", "links", f"leaf {i}") for i in range(1000)] + [("other", "is", "small")])
    assert ("other", "is", "small") in hub.lookup("hub and other", max_triples=5).triples


def test_a_lookup_refuses_hops_or_max_triples_below_one_and_stops_when_the_walk_runs_out() -> None:
    graph = wb.KnowledgeGraph([("France", "capital", "Paris"), ("France", "borders", "Spain")])
    for hops, max_triples in [(0, 5), (-1, 5), (1, 0), (1, -3), (True, 5), (1.5, 5)]:
        with pytest.raises(wb.GraphError, match="must be a whole number of at least 1"):
            graph.lookup("France", hops=hops, max_triples=max_triples)
    for query in (None, 42, ["France"], b"France"):
        with pytest.raises(wb.GraphError, match=r"lookup: the query must be text, got"):
            graph.lookup(query)  # type: ignore[arg-type]
    # Past the last node reached there is nothing to walk: a billion hops ends at once, with what there is.
    assert graph.lookup("France", hops=10**9).triples == graph.lookup("France", hops=2).triples


def test_a_workbench_loads_each_graph_once(bench: wb.Workbench) -> None:
    assert bench.graph("countries") is bench.graph("countries")
    assert len(bench.graph("countries")) > 1000


# -- the user's graphs ---------------------------------------------------------------------------


def test_csv_triples_with_aliases_and_codes(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text(CSV_TRIPLES, encoding="utf-8")
    graph = load_file(path)
    assert len(graph) == 3  # alias and code rows are names, not facts
    assert graph.link("what did the countess of lovelace write?") == ["Ada Lovelace"]
    assert graph.link("and CB? (not cb)") == ["Charles Babbage"]
    facts = graph.lookup("Ada Lovelace", hops=2).facts
    assert facts.splitlines() == [
        "Ada Lovelace — field — mathematics.",
        "Ada Lovelace — wrote notes on — Analytical Engine.",
        "Charles Babbage — designed — Analytical Engine.",
    ]


def test_alias_and_code_rows_are_names_in_any_case(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text(CSV_TRIPLES.replace(",alias,", ",Alias,").replace(",code,", ", CODE ,"), encoding="utf-8")
    graph = load_file(path)
    assert len(graph) == 3
    assert graph.link("the countess of lovelace and CB") == ["Ada Lovelace", "Charles Babbage"]


def test_json_triples_as_lists_or_objects(tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    path.write_text(json.dumps([["Oslo", "capital of", "Norway"],
                                {"subject": "Norway", "relation": "currency", "object": "krone"}]), encoding="utf-8")
    assert load_file(path).lookup("oslo", hops=2).facts == "Oslo — capital of — Norway.\nNorway — currency — krone."
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"triples": [["a", "b", "c"]]}), encoding="utf-8")
    assert load_file(wrapped).lookup("A").triples == (("a", "b", "c"),)


@pytest.mark.parametrize(("name", "content", "words"), [
    ("g.csv", "from,to\na,b\n", r"row 1: the header must be subject,relation,object"),
    ("g.csv", "subject,relation,object\na,b,c\nd,e\n", r"row 3: a triple has 3 values .* this has 2"),
    ("g.csv", "subject,relation,object\na,b,c\n\nd, ,f\n", r"row 4: the relation must be non-empty text"),
    ("g.csv", "subject,relation,object\n", r"holds no triples"),
    ("g.json", '[["a", "b", "c"],\n ["d", "e"', r"line 2: not valid JSON"),
    ("g.json", '{"a": 1}', r"the JSON must be a list of triples, not dict"),
    ("g.json", '[["a", "b", "c"], "d e f"]', r"item 2: a triple is a list or an object, not str"),
    ("g.json", '[{"subject": "a", "relation": "b", "objekt": "c"}]', r"item 1: unknown key 'objekt'"),
    ("g.json", '[["a", "b", 3]]', r"item 1: the object must be non-empty text, got 3"),
    ("g.json", '[["a", "b", "c"],\n ["d", "e", ' + "9" * 5000 + "]]",
     r"line 2: not valid JSON: a number of 5,000 digits is too long"),
    ("g.txt", "a,b,c", r"neither \.csv nor \.json"),
    # A fact with a lone surrogate broke every trace table it went into, the workbench's whole one with it.
    ("g.json", '[["a", "b", "c"], ["x\\ud800", "b", "c"]]',
     r"item 2: the subject is not valid text: it holds a lone surrogate \('\\ud800'\) at character 1"),
])
def test_bad_files_say_which_file_and_row(tmp_path: Path, name: str, content: str, words: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(wb.GraphError, match=words) as info:
        load_file(path)
    assert str(path) in str(info.value)


def test_a_surrogate_pair_in_a_json_graph_is_the_character_it_stands_for(tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    path.write_text('[["smile \\ud83d\\ude00", "is", "a face"]]', encoding="utf-8")
    assert load_file(path).lookup("smile \U0001f600").triples[0].subject == "smile \U0001f600"


def test_files_that_are_not_text_or_too_big_or_not_files_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "g.csv"
    binary.write_bytes(b"subject,relation,object\n\xff\xfe,b,c\n")
    with pytest.raises(wb.GraphError, match="line 2: not UTF-8"):
        load_file(binary)
    big = tmp_path / "big.csv"
    big.write_text("subject,relation,object\n" + "a,b,c\n" * 100, encoding="utf-8")
    monkeypatch.setattr(files, "MAX_GRAPH_BYTES", 200)
    with pytest.raises(wb.GraphError, match="over the 200 a graph may take"):
        load_file(big)
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(wb.GraphError, match="not a regular file"):
        load_file(tmp_path / "dir.csv")
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)  # reading one would block: refused before it is opened
    with pytest.raises(wb.GraphError, match="not a regular file"):
        load_file(fifo)


def test_an_edited_file_is_read_again(bench: wb.Workbench, tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    path.write_text("subject,relation,object\na,r,b\n", encoding="utf-8")
    first = bench.graph(path)
    assert bench.graph(path) is first
    path.write_text("subject,relation,object\na,r,b\na,r,c\n", encoding="utf-8")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert len(bench.graph(path)) == 2
    assert list(bench.graphs.loaded()) == [str(path)]  # the old version is let go


# -- the spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"graph": "contries"}, "graph", r"unknown graph 'contries' \(did you mean 'countries'\?\)"),
    ({"graph": "./missing.csv"}, "graph", r"graph file '.*missing\.csv' does not exist"),
    ({"graph": "notes.txt"}, "graph", r"neither \.csv nor \.json"),
    ({"hops": 0}, "hops", r"hops must be an integer from 1 to 4, got 0"),
    ({"hops": 5}, "hops", r"hops must be an integer from 1 to 4, got 5"),
    ({"hops": "2"}, "hops", r"hops must be an integer from 1 to 4, got '2'"),
    ({"hops": True}, "hops", r"hops must be an integer from 1 to 4, got True"),
    ({"max_triples": 10_000}, "max_triples", r"max_triples must be an integer from 1 to 1000"),
    ({"hop": 2}, "hop", r"unknown field 'hop' \(did you mean 'hops'\?\)"),
    ({"model": "tiny"}, "model", r"unknown field 'model'"),
    ({"query": ""}, "query", r"needs 'query'"),
    ({"query": "{{ question "}, "query", r"does not parse"),
])
def test_spec_errors_name_the_hop_field_and_line(
    tiny_bench: wb.Workbench, fields: dict[str, object], field: str, words: str
) -> None:
    hop = {"name": "facts", "kind": "knowledge", "graph": "countries", "query": "{{ question }}", **fields}
    text = "name: kg\nhops:\n" + "".join(
        f"  {'- ' if i == 0 else '  '}{k}: {json.dumps(v)}\n" for i, (k, v) in enumerate(hop.items())
    )
    with pytest.raises(wb.SpecError, match=words) as info:
        tiny_bench.chain(text)
    assert (info.value.hop, info.value.field) == ("facts", field)
    assert info.value.line == 3 + list(hop).index(field)


def test_kind_is_checked_and_graph_alone_means_knowledge(tiny_bench: wb.Workbench) -> None:
    with pytest.raises(wb.SpecError, match=r"kind must be 'llm', 'python' or 'knowledge'.*did you mean 'knowledge'"):
        tiny_bench.chain(knowledge_spec("countries", kind="knowlege"))
    spec = knowledge_spec("countries")
    del spec["hops"][0]["kind"]  # type: ignore[index]
    chain = tiny_bench.chain(spec)
    assert chain.spec.hops[0].kind == "knowledge" and chain.inputs == ("question",)


def test_a_malformed_file_fails_when_the_chain_is_built(tiny_bench: wb.Workbench, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("subject,relation,object\na,b\n", encoding="utf-8")
    with pytest.raises(wb.GraphError, match=r"hop 'facts', field 'graph'.*row 2: a triple has 3 values") as info:
        tiny_bench.chain(knowledge_spec(str(path)))
    assert isinstance(info.value, wb.SpecError)


def test_a_relative_path_is_read_from_the_working_directory(
    bench: wb.Workbench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "people.csv").write_text(CSV_TRIPLES, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    chain = bench.chain(knowledge_spec("people.csv"))
    monkeypatch.chdir("/")  # the path was fixed when the chain was built
    assert chain.run(question="Who is Charles Babbage?").output == "Charles Babbage — designed — Analytical Engine."


def _spec_file(folder: Path, graph: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kg.yaml"
    path.write_text(f"name: kg\nhops:\n  - name: facts\n    graph: {graph}\n    query: '{{{{ question }}}}'\n",
                    encoding="utf-8")
    return path


def test_a_relative_path_in_a_spec_file_is_read_from_the_files_folder(
    bench: wb.Workbench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # specs/kg.yaml names people.csv beside it; the notebook runs from elsewhere (and %cd's on).
    spec = _spec_file(tmp_path / "specs", "people.csv")
    (tmp_path / "specs" / "people.csv").write_text(CSV_TRIPLES, encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    chain = bench.chain(Path("../specs/kg.yaml"))
    assert chain.run(question="Who is Charles Babbage?").output == "Charles Babbage — designed — Analytical Engine."
    monkeypatch.chdir("/")
    chain.set("description", "facts")  # new versions, parsed again after the cwd moved
    chain.update(spec.read_text(encoding="utf-8") + "    hops: 2\n")
    assert "Charles Babbage — designed" in chain.run(question="Who is Ada Lovelace?").output
    # A configuration's chain file alike (its path is relative to the configuration).
    (tmp_path / "workbench.yaml").write_text("chains:\n  kg: specs/kg.yaml\n", encoding="utf-8")
    configured = bench.configure(tmp_path / "workbench.yaml").chains["kg"]
    assert configured.run(question="Who is Charles Babbage?").output == \
        "Charles Babbage — designed — Analytical Engine."
    # Text or a dict has no file: its relative paths are the working directory's, unless base_dir says otherwise.
    assert bench.chain(knowledge_spec("people.csv"), base_dir=spec.parent).spec.hops[0].knowledge.source.path == \
        spec.parent / "people.csv"  # type: ignore[union-attr]


def test_a_knowledge_hops_walk_is_set_live_and_what_it_does_not_take_is_refused_saying_what_can(
    bench: wb.Workbench
) -> None:
    chain = bench.chain(knowledge_spec("countries"))
    chain.set({"facts.hops": 2, "facts.max_triples": 3})
    run = chain.run(question="France")
    assert run.outputs["facts"].count("\n") == 2  # three facts
    # retry was offered for a knowledge hop, and its spec then refused it as an unknown field 'did you mean query?'
    with pytest.raises(wb.SpecError, match="'retry' of a knowledge hop cannot be set live") as info:
        chain.set("facts.retry", {"attempts": 2})
    assert "query, hops, max_triples" in str(info.value.hint)
    with pytest.raises(wb.SpecError, match="'graph' of a knowledge hop cannot be set live"):
        chain.set("facts.graph", "other.csv")


def test_autoglm_run_reads_a_relative_graph_from_the_spec_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from workbench.fronts.cli import main

    _spec_file(tmp_path / "specs", "people.csv")
    (tmp_path / "specs" / "people.csv").write_text(CSV_TRIPLES, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "specs/kg.yaml", "question=Who is Charles Babbage?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == "Charles Babbage — designed — Analytical Engine."


def test_a_missing_graph_file_says_which_path_was_tried_and_relative_to_what(
    bench: wb.Workbench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec_file(tmp_path / "specs", "people.csv")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(wb.GraphError) as info:
        bench.chain(spec)
    tried = str(tmp_path / "specs" / "people.csv")
    assert f"graph file 'people.csv' does not exist: looked for {tried!r}, relative to the spec file's folder" \
        in info.value.message
    with pytest.raises(wb.GraphError) as info:
        bench.chain(knowledge_spec("people.csv"))
    assert f"looked for {str(tmp_path / 'people.csv')!r}, relative to the working directory" in info.value.message
    with pytest.raises(wb.GraphError) as info:
        bench.chain(knowledge_spec(str(tmp_path / "gone.csv")))
    assert f"graph file {str(tmp_path / 'gone.csv')!r} does not exist" in info.value.message


# -- running it ----------------------------------------------------------------------------------


def test_knowledge_then_llm_runs_and_the_prompt_carries_the_facts(loaded: wb.Workbench, tiny_path: Path) -> None:
    run = loaded.chain(GEO_SPEC).run(question="What is the capital of France?")
    facts = run.outputs["facts"]
    assert isinstance(facts, wb.Facts) and isinstance(run.output, str)
    assert "France — capital — Paris." in facts
    table = run.trace.table()
    hop = table[table["name"] == "hop facts"].iloc[0]
    answer = table[table["name"] == "hop answer"].iloc[0]
    assert answer["attributes.input.value"].startswith("Facts:\nFrance — capital — Paris.\n")
    assert hop["attributes.openinference.span.kind"] == "RETRIEVER"
    assert hop["attributes.workbench.hop.kind"] == "knowledge"
    assert hop[f"attributes.{attr.KNOWLEDGE_ENTITIES}"] == ["France"]
    assert hop[f"attributes.{attr.KNOWLEDGE_TRIPLES}"] == len(facts.triples)
    assert hop[f"attributes.{attr.KNOWLEDGE_PROMPT_CHARS}"] == len(facts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    tokens = len(tokenizer(facts, add_special_tokens=False)["input_ids"])
    assert hop[f"attributes.{attr.KNOWLEDGE_PROMPT_TOKENS}"] == tokens
    assert hop[f"attributes.{attr.KNOWLEDGE_TOKENIZER}"] == "tiny"
    assert hop[f"attributes.{attr.KNOWLEDGE_LINK_MS}"] >= 0 and hop[f"attributes.{attr.KNOWLEDGE_TRAVERSE_MS}"] >= 0
    assert hop[f"attributes.{attr.KNOWLEDGE_GRAPH}"] == "countries"
    assert not hop[f"attributes.{attr.KNOWLEDGE_TRUNCATED}"]


def test_a_template_reads_the_triples_and_a_session_keeps_the_text(loaded: wb.Workbench) -> None:
    spec = {
        "name": "capitals",
        "hops": [
            {"name": "facts", "graph": "countries", "query": "{{ question }}"},
            {"name": "answer", "model": "tiny", "max_new_tokens": 2,
             "prompt": "{% for s, r, o in facts.triples if r == 'capital' %}{{ s }}: {{ o }}\n{% endfor %}A:"},
        ],
    }
    run = loaded.chain(spec).run(question="Spain or Portugal?", session="kg")
    prompt = run.trace.table().set_index("name").loc["hop answer", "attributes.input.value"]
    assert prompt == "Spain: Madrid\nPortugal: Lisbon\nA:"
    (record,) = loaded.session("kg").records()
    assert record.outputs["facts"] == str(run.outputs["facts"])


def test_a_model_not_loaded_yet_leaves_the_cost_in_characters(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.register("tiny", tiny_path)  # lazy: it loads when the answer hop calls it, after the facts hop
    run = bench.chain(GEO_SPEC).run(question="Japan")
    row = run.trace.table().set_index("name").loc["hop facts"]
    assert row[f"attributes.{attr.KNOWLEDGE_PROMPT_CHARS}"] == len(run.outputs["facts"]) > 0
    tokens = f"attributes.{attr.KNOWLEDGE_PROMPT_TOKENS}"
    assert tokens not in row or row.isna()[tokens]  # counting never loads a model


def test_the_cap_holds_on_a_knowledge_only_chain(bench: wb.Workbench) -> None:
    run = bench.chain(knowledge_spec("countries", hops=2, max_triples=5)).run(question="Japan")
    row = run.trace.table().set_index("name").loc["hop facts"]
    assert row[f"attributes.{attr.KNOWLEDGE_TRIPLES}"] == 5 and row[f"attributes.{attr.KNOWLEDGE_TRUNCATED}"]
    assert len(run.output.splitlines()) == 5


def test_the_builder_round_trips_a_knowledge_hop(loaded: wb.Workbench) -> None:
    from workbench.fronts.notebook.widgets import ChainBuilder

    chain = loaded.chain(GEO_SPEC)
    builder = ChainBuilder(loaded, chain=chain)
    editor = builder.hop_editors[0]
    assert (editor.kind.value, editor.graph.value, editor.hops_slider.value) == ("knowledge", "countries", 1)
    editor.hops_slider.value = 2
    rebuilt = loaded.chain(builder.spec())
    assert rebuilt.graph() == chain.graph()
    assert rebuilt.spec.hops[0].knowledge.hops == 2  # type: ignore[union-attr]
    assert "graph countries" in builder.graph.value
    assert "graph countries, 1 hop, at most 50 triples" in chain._repr_html_()


def test_a_file_edited_after_the_chain_was_built_is_read_again_by_the_hop(bench: wb.Workbench, tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    path.write_text(json.dumps([["Ada", "wrote", "notes"]]), encoding="utf-8")
    chain = bench.chain(knowledge_spec(str(path)))
    first = chain.run(question="Ada?").trace.table().set_index("name").loc["hop facts"]
    assert first[f"attributes.{attr.KNOWLEDGE_INLINE}"]  # loaded when the chain was built: looked up on the loop
    assert f"attributes.{attr.KNOWLEDGE_LOAD_MS}" not in first or first.isna()[f"attributes.{attr.KNOWLEDGE_LOAD_MS}"]
    path.write_text(json.dumps([["Ada", "wrote", "notes"], ["Ada", "knew", "Babbage"]]), encoding="utf-8")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    run = chain.run(question="Ada?")
    row = run.trace.table().set_index("name").loc["hop facts"]
    assert run.output == "Ada — wrote — notes.\nAda — knew — Babbage."
    assert row[f"attributes.{attr.KNOWLEDGE_LOAD_MS}"] >= 0 and not row[f"attributes.{attr.KNOWLEDGE_INLINE}"]


def _touch_later(path: Path) -> None:
    """A new mtime for sure (a file system's clock may not tick between two writes in a test)."""
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))


def test_a_graph_file_broken_while_served_keeps_the_last_good_graph_and_says_so(
    bench: wb.Workbench, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "g.json"
    path.write_text(json.dumps([["Ada", "wrote", "notes"]]), encoding="utf-8")
    chain = bench.chain(knowledge_spec(str(path)))
    server = bench.serve([chain], port=0, auth=False)
    try:
        path.write_text('[["Ada", "wrote", "notes"], ["Ada", "knew"', encoding="utf-8")  # an editor's save cut short
        _touch_later(path)
        runs = [chain.run(question="Ada?") for _ in range(3)]
        answer = httpx.post(f"{server.url}/v1/chains/kg/invoke", json={"inputs": {"question": "Ada?"}}, timeout=30)
    finally:
        server.stop()
    assert [r.output for r in runs] == ["Ada — wrote — notes."] * 3  # the last good graph answers
    assert answer.status_code == 200 and answer.json()["output"] == "Ada — wrote — notes.", answer.text
    row = runs[-1].trace.table().set_index("name").loc["hop facts"]
    assert row[f"attributes.{attr.KNOWLEDGE_STALE}"]
    assert "line 1: not valid JSON" in row[f"attributes.{attr.KNOWLEDGE_RELOAD_ERROR}"]
    said = [r for r in caplog.records if "keep" in r.getMessage() and str(path) in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"  # once for this version of the file, not every run

    path.write_text(json.dumps([["Ada", "wrote", "notes"], ["Ada", "knew", "Babbage"]]), encoding="utf-8")
    _touch_later(path)
    run = chain.run(question="Ada?")
    assert run.output == "Ada — wrote — notes.\nAda — knew — Babbage."
    assert f"attributes.{attr.KNOWLEDGE_STALE}" not in run.trace.table() or \
        not run.trace.table().set_index("name").loc["hop facts"][f"attributes.{attr.KNOWLEDGE_STALE}"]
    # The file gone for a while (an editor that saves by rename) is the same: the last good graph answers.
    path.unlink()
    assert chain.run(question="Ada?").output == "Ada — wrote — notes.\nAda — knew — Babbage."
    path.write_text(json.dumps([["Ada", "wrote", "notes"]]), encoding="utf-8")
    # Building a chain, or bench.graph, on the broken file is a load: that fails, saying why.
    path.write_text("[", encoding="utf-8")
    _touch_later(path)
    with pytest.raises(wb.GraphError, match="not valid JSON"):
        bench.chain(knowledge_spec(str(path)))
    with pytest.raises(wb.GraphError, match="not valid JSON"):
        bench.graph(path)


def test_a_long_query_or_a_big_walk_is_looked_up_in_the_hop_pool(bench: wb.Workbench) -> None:
    run = bench.chain(knowledge_spec("countries")).run(question="Peru " + "and so on " * 500)
    row = run.trace.table().set_index("name").loc["hop facts"]
    assert not row[f"attributes.{attr.KNOWLEDGE_INLINE}"]
    assert row[f"attributes.{attr.KNOWLEDGE_ENTITIES}"] == ["Peru"]
    run = bench.chain(knowledge_spec("countries", hops=3, max_triples=1000)).run(question="Peru")
    row = run.trace.table().set_index("name").loc["hop facts"]
    assert not row[f"attributes.{attr.KNOWLEDGE_INLINE}"] and row[f"attributes.{attr.KNOWLEDGE_TRIPLES}"] > 200


def test_a_misspelt_input_in_the_query_is_named(tiny_bench: wb.Workbench) -> None:
    spec = {**knowledge_spec("countries"), "inputs": ["question"]}
    spec["hops"][0]["query"] = "{{ qestion }}"  # type: ignore[index]
    with pytest.raises(wb.SpecError, match=r"'qestion' is used .* \(did you mean 'question'\?\)") as info:
        tiny_bench.chain(spec)
    assert (info.value.hop, info.value.field) == ("facts", "query")


def test_a_knowledge_hop_reads_an_earlier_hops_output(tiny_bench: wb.Workbench) -> None:
    spec = {"name": "two_step", "hops": [
        {"name": "canned", "call": "workbench.demo:canned_answer"},
        {"name": "facts", "graph": "countries", "query": "{{ canned }}", "max_triples": 1},
    ]}
    chain = tiny_bench.chain(spec)
    assert chain.graph()["facts"] == ("canned",) and chain.inputs == ("question",)
    assert chain.run(question="What about Peru?").output == "Peru — capital — Lima."


def test_a_graph_past_the_triple_cap_is_refused_and_a_workbench_keeps_few_graphs(
    bench: wb.Workbench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workbench.knowledge import store

    path = tmp_path / "many.csv"
    path.write_text("subject,relation,object\n" + "".join(f"a{i},r,b{i}\n" for i in range(5)), encoding="utf-8")
    monkeypatch.setattr(files, "MAX_TRIPLES", 3)
    with pytest.raises(wb.GraphError, match=r"row 5: more than 3 triples"):
        load_file(path)
    monkeypatch.setattr(store, "MAX_GRAPHS_KEPT", 2)
    for name in ("one", "two", "three"):
        (tmp_path / f"{name}.json").write_text(json.dumps([[name, "is", "a graph"]]), encoding="utf-8")
        bench.graph(tmp_path / f"{name}.json")
    assert [Path(p).name for p in bench.graphs.loaded()] == ["two.json", "three.json"]
    monkeypatch.setattr(store, "MAX_GRAPHS_KEPT", 16)
    monkeypatch.setattr(files, "MAX_TRIPLES", 100)
    monkeypatch.setattr(store, "MAX_TRIPLES_KEPT", 4)  # and a bound on triples in all, past which the oldest go
    bench.graph(path)  # five triples: alone past the bound, kept as the graph just asked for
    assert [Path(p).name for p in bench.graphs.loaded()] == ["many.csv"]
    bench.graph(tmp_path / "one.json")
    assert [Path(p).name for p in bench.graphs.loaded()] == ["one.json"]


def test_the_graph_a_chain_keeps_using_is_not_the_one_a_full_store_lets_go(
    bench: wb.Workbench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, past MAX_GRAPHS_KEPT the graph loaded first went, however often runs used it: a chain's graph went when
    # 16 others were looked at in the notebook, and a bad save of its file then failed its runs instead of leaving the
    # last good graph answering.
    from workbench.knowledge import store

    monkeypatch.setattr(store, "MAX_GRAPHS_KEPT", 2)
    for name in ("used", "other", "third"):
        (tmp_path / f"{name}.json").write_text(json.dumps([["Ada", name, "notes"]]), encoding="utf-8")
    chain = bench.chain(knowledge_spec(str(tmp_path / "used.json")))
    bench.graph(tmp_path / "other.json")
    assert chain.run(question="Ada?").output == "Ada — used — notes."  # used since "other" was loaded
    bench.graph(tmp_path / "third.json")  # one graph too many: the one used least recently goes
    assert [Path(p).name for p in bench.graphs.loaded()] == ["used.json", "third.json"]
    (tmp_path / "used.json").write_text('[["Ada", "used"', encoding="utf-8")  # an editor's save cut short
    _touch_later(tmp_path / "used.json")
    run = chain.run(question="Ada?")
    assert run.output == "Ada — used — notes."
    assert run.trace.table().set_index("name").loc["hop facts"][f"attributes.{attr.KNOWLEDGE_STALE}"]


def test_a_query_past_the_length_a_lookup_links_fails_the_hop_at_once(countries: wb.KnowledgeGraph,
                                                                       bench: wb.Workbench) -> None:
    # A template may render ten million characters: on the shipped graph their lookup took 24 s and 1 GB (NFKD expands
    # U+FDFA eighteen times over), with no bound on the hop's time.
    from workbench.knowledge.graph import MAX_QUERY_CHARS

    assert countries.lookup("France " * (MAX_QUERY_CHARS // 7)).entities == ("France",)  # up to the bound: linked
    chain = bench.chain({"name": "big", "hops": [{"name": "facts", "kind": "knowledge", "graph": "countries",
                                                   "query": "{{ ('%c' % 65018) * 10000000 }}"}]})
    with pytest.raises(wb.HopFailed) as info:
        chain.run()
    assert isinstance(info.value.cause, wb.GraphError)
    assert "the query is 10,000,000 characters, over the 100,000 a query may have" in str(info.value.cause)


def test_currency_codes_and_common_words_are_not_names(countries: wb.KnowledgeGraph) -> None:
    assert countries.link("try all the top islands, a male Polish speaker") == []
    assert countries.link("Is ALL the lek? TRY and EUR") == ["ALL", "TRY", "EUR"]
    assert countries.link("Malé, Iceland and Poland") == ["Iceland", "Poland"]  # Malé is left out with "male"


@pytest.mark.parametrize(("graph", "words"), [
    ("a\x00b.csv", r"is not a path: embedded null byte"),
    ("~no_such_user_here/g.csv", r"no home directory for '~no_such_user_here'"),
    ("x" * 5000 + ".csv", r"graph file '.*…"),
    (42, r"graph must name a demo graph or a file, got 42"),
    (["countries"] * 100_000, r"graph must name a demo graph or a file, got \['countries', 'countries'"),
])
def test_odd_graph_values_are_spec_errors(tiny_bench: wb.Workbench, graph: object, words: str) -> None:
    with pytest.raises(wb.GraphError, match=words) as info:
        tiny_bench.chain(knowledge_spec(graph))  # type: ignore[arg-type]
    assert len(info.value.message) < 400 and info.value.hop == "facts"


def test_a_spec_sent_to_a_server_names_only_shipped_graphs(bench: wb.Workbench, tmp_path: Path) -> None:
    """A client's spec must not read the server's files into a prompt: inside served_spec() a path is refused
    before the file is even looked at (so the refusal says nothing of whether it exists); demo graphs still work."""
    from workbench.chains import trust

    secret = tmp_path / "secret.csv"
    secret.write_text("subject,relation,object\nalice,password,hunter2\n")
    spec = {"name": "leak", "hops": [{"name": "facts", "kind": "knowledge", "graph": str(secret), "query": "{{ question }}"}]}
    with trust.served_spec(), pytest.raises(wb.GraphError, match="only the shipped graphs") as caught:
        bench.chain(spec)
    assert caught.value.hop == "facts" and caught.value.field == "graph"
    with trust.served_spec(), pytest.raises(wb.GraphError, match="only the shipped graphs"):
        bench.chain({**spec, "hops": [{**spec["hops"][0], "graph": str(tmp_path / "missing.csv")}]})
    with trust.served_spec():
        chain = bench.chain({**spec, "name": "ok", "hops": [{**spec["hops"][0], "graph": "countries"}]})
    assert "Paris" in str(chain.run(question="France").output)
    assert "hunter2" in str(bench.chain(spec).run(question="alice").output)  # the notebook's own spec may read its own files
