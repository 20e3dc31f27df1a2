"""Knowledge graphs for ``kind: knowledge`` hops: triples in networkx, entity linking by aliases, k-hop facts.

A leaf below the chains: it knows graphs and files, not hops, spans or models.
"""

from workbench.errors import GraphError
from workbench.knowledge.files import load_file
from workbench.knowledge.graph import DEFAULT_MAX_TRIPLES, Facts, KnowledgeGraph, Lookup, Triple
from workbench.knowledge.store import DEMO_GRAPHS, GraphSource, GraphStore, resolve

__all__ = [
    "DEFAULT_MAX_TRIPLES", "DEMO_GRAPHS", "Facts", "GraphError", "GraphSource", "GraphStore", "KnowledgeGraph",
    "Lookup", "Triple", "load_file", "resolve",
]
