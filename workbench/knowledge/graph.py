"""A knowledge graph of (subject, relation, object) triples: link a text's entities, walk k hops, say what was found."""

from __future__ import annotations

import functools
import itertools
import re
import time
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from workbench.errors import GraphError

if TYPE_CHECKING:
    import networkx as nx

DEFAULT_MAX_TRIPLES = 50
# The longest alias the linker tries, in words: titles run to twenty or so, and a longer node (a description
# held as an object) would make every word it starts with ("the") cost a try per length when linking.
MAX_ALIAS_WORDS = 32
# The longest query a lookup links: a question, or a passage, not a corpus. Linking costs ~0.3-4 us a character (more
# for text whose accents and compatibility forms expand), and a template may render ten million characters into one.
MAX_QUERY_CHARS = 100_000
_WORD = re.compile(r"\w+")
_WINDOW = 4_096  # the words of a text the linker holds at once: a long query is read a window at a time


class Triple(NamedTuple):
    """One fact: ``subject — relation — object``."""

    subject: str
    relation: str
    object: str

    def __str__(self) -> str:
        return f"{self.subject} — {self.relation} — {self.object}."


class Facts(str):
    """What a knowledge hop found, as the text a prompt reads (one triple a line), with the triples themselves.

    It is a ``str``, so ``{{ facts }}`` renders the lines and a run's outputs store it as text;
    a template may also read ``{{ facts.triples }}`` (tuples of subject, relation, object) and
    ``{{ facts.entities }}`` (the graph's names for what the query mentioned).
    """

    triples: tuple[Triple, ...]
    entities: tuple[str, ...]

    def __new__(cls, triples: Iterable[Triple], entities: Iterable[str] = ()) -> Facts:
        triples = tuple(triples)
        facts = super().__new__(cls, "\n".join(str(t) for t in triples))
        facts.triples = triples
        facts.entities = tuple(entities)
        return facts

    def __reduce__(self) -> tuple[object, ...]:  # copy.deepcopy and pickle rebuild it from its triples
        return (Facts, (self.triples, self.entities))


@dataclass(frozen=True)
class Lookup:
    """One query against a graph: the facts found, and what finding them took (for the hop's span)."""

    facts: Facts
    link_ms: float
    traverse_ms: float
    truncated: bool  # the walk stopped at max_triples with more to find

    @property
    def entities(self) -> tuple[str, ...]:
        return self.facts.entities

    @property
    def triples(self) -> tuple[Triple, ...]:
        return self.facts.triples


def normalise(text: str) -> list[str]:
    """The words of ``text`` as the linker compares them: accents dropped, case folded, punctuation gone."""
    return _WORD.findall(_strip_accents(text).casefold())


def _strip_accents(text: str) -> str:
    # By str.translate, not a character at a time: one character can decompose into eighteen (U+FDFA), and a list of
    # them made a 1 MiB query cost 600 MB.
    return text if text.isascii() else unicodedata.normalize("NFKD", text).translate(_combining())


@functools.cache
def _combining() -> dict[int, None]:
    """The combining characters (accents and other marks), as a str.translate table that drops them (~70 ms, once)."""
    return {code: None for code in range(0x110000) if unicodedata.combining(chr(code))}


class KnowledgeGraph:
    """Triples in a networkx MultiDiGraph (an edge per triple, keyed by relation) and an alias dictionary.

    ``aliases`` map other names to a node: matched in any case, without accents
    (``"french"`` -> France). ``codes`` map short codes to a node and match only as written
    (``"FR"`` -> France), so the words "us", "in" and "it" stay words. Every node's own name is
    an alias of it, but for a node that is a code of its own (``codes={"ALL": "ALL"}``, the
    Albanian lek, must not link the word "all"). ``ignore`` lists words never to link, names
    in the data that are more often plain words (the capital Malé and "male").
    """

    def __init__(
        self,
        triples: Iterable[tuple[str, str, str]],
        aliases: Mapping[str, str] | None = None,
        codes: Mapping[str, str] | None = None,
        name: str = "graph",
        ignore: Iterable[str] = (),
    ) -> None:
        import networkx  # on first use: a spec that names no graph, and the CLI's --help, never pay its 0.2 s

        self.name = name
        self.graph: nx.MultiDiGraph = networkx.MultiDiGraph()
        for subject, relation, obj in triples:
            self.graph.add_edge(subject, obj, key=relation)
        self._codes = {code: node for code, node in (codes or {}).items() if node in self.graph}
        self._aliases: dict[str, str] = {}
        for node in self.graph.nodes:  # a node's own name first: no alias of another node takes it
            if self._codes.get(node) != node:
                self._add_alias(node, node)
        for alias, node in (aliases or {}).items():
            if node in self.graph:
                self._add_alias(alias, node)
        for word in ignore:
            self._aliases.pop(" ".join(normalise(word)), None)
        # For each word an alias starts with, the lengths (in words) of those aliases, longest first: the linker tries
        # only these, so a title of a dozen words links, and a word that starts no alias costs one lookup.
        lengths: dict[str, set[int]] = {}
        for key in self._aliases:
            words = key.count(" ") + 1
            if words <= MAX_ALIAS_WORDS:
                lengths.setdefault(key.partition(" ")[0], set()).add(words)
        self._lengths = {word: tuple(sorted(counts, reverse=True)) for word, counts in lengths.items()}

    def _add_alias(self, alias: str, node: str) -> None:
        key = " ".join(normalise(alias))
        if key:
            self._aliases.setdefault(key, node)

    def __len__(self) -> int:
        """How many triples the graph holds."""
        return int(self.graph.number_of_edges())

    def __repr__(self) -> str:
        return f"KnowledgeGraph({self.name!r}: {self.graph.number_of_nodes()} entities, {len(self)} triples)"

    @property
    def alias_count(self) -> int:
        return len(self._aliases) + len(self._codes)

    def link(self, text: str) -> list[str]:
        """The entities ``text`` mentions, in order, each once: the longest alias (of up to 32 words) wins at each word.

        "Papua New Guinea" links Papua New Guinea, not Guinea.
        """
        matches = _WORD.finditer(_strip_accents(text))
        words: list[str] = []  # a window of the text's words from words[i] on, refilled as the linker moves along
        folded: list[str] = []
        found: dict[str, None] = {}
        i = 0
        while True:
            if len(words) - i < MAX_ALIAS_WORDS:  # the longest alias could run past the window: slide it on
                del words[:i], folded[:i]
                i = 0
                more = [m.group() for m in itertools.islice(matches, _WINDOW)]
                words += more
                folded += (w.casefold() for w in more)
            if i >= len(words):
                break
            node = None
            for n in self._lengths.get(folded[i], ()):
                if n <= len(words) - i:
                    node = self._aliases.get(" ".join(folded[i:i + n]))
                    if node is not None:
                        break
            if node is None:
                n, node = 1, self._codes.get(words[i])
            if node is not None:
                found.setdefault(node, None)
            i += n
        return list(found)

    def neighbourhood(self, entities: Iterable[str], hops: int, max_triples: int = DEFAULT_MAX_TRIPLES
                      ) -> tuple[list[Triple], bool]:
        """Triples within ``hops`` of ``entities`` (either direction), nearest first, at most ``max_triples``.

        Hop 1 is every triple that names an entity; hop 2 adds every triple naming what hop 1
        reached; and so on. Within a hop the nodes take a triple each in turn, so when the cap
        cuts the walk every entity has its share ("China or Japan?" is not all China).
        Returns the triples and whether the cap cut the walk short.
        """
        graph = self.graph
        frontier = [e for e in dict.fromkeys(entities) if e in graph]
        seen = set(frontier)
        triples: list[Triple] = []
        taken: set[tuple[str, str, str]] = set()
        for _ in range(hops):
            if not frontier:
                break  # the walk reached everything it can: more hops find nothing more
            reached: list[str] = []
            # Lazily, so a hub with a million edges costs only the ones taken before the cap.
            turns = [(node, itertools.chain(graph.out_edges(node, keys=True), graph.in_edges(node, keys=True)))
                     for node in frontier]
            while turns:
                more = []
                for node, edges in turns:
                    for subject, obj, relation in edges:
                        if (subject, relation, obj) in taken:
                            continue
                        if len(triples) >= max_triples:
                            return triples, True
                        taken.add((subject, relation, obj))
                        triples.append(Triple(subject, relation, obj))
                        other = obj if subject == node else subject
                        if other not in seen:
                            seen.add(other)
                            reached.append(other)
                        more.append((node, edges))  # its next triple waits for every other node's turn
                        break
                turns = more
            frontier = reached
        return triples, False

    def lookup(self, query: str, hops: int = 1, max_triples: int = DEFAULT_MAX_TRIPLES) -> Lookup:
        """Link ``query``'s entities, walk ``hops`` around them, and time both."""
        if not isinstance(query, str):
            raise GraphError(f"lookup: the query must be text, got {type(query).__name__} {query!r:.40}",
                             hint='e.g. graph.lookup("What borders France?", hops=1)')
        if len(query) > MAX_QUERY_CHARS:
            raise GraphError(f"lookup: the query is {len(query):,} characters, over the {MAX_QUERY_CHARS:,} a query may "
                             "have", hint="put the question in the query, not a whole document; or cut it short: "
                             "{{ question[:2000] }}")
        for name, value in (("hops", hops), ("max_triples", max_triples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GraphError(f"lookup: {name} must be a whole number of at least 1, got {value!r:.40}",
                                 hint="hops=1: the facts naming what the query mentions; max_triples caps them")
        started = time.perf_counter()
        entities = self.link(query)
        linked = time.perf_counter()
        triples, truncated = self.neighbourhood(entities, hops, max_triples)
        walked = time.perf_counter()
        return Lookup(Facts(triples, entities), (linked - started) * 1e3, (walked - linked) * 1e3, truncated)
