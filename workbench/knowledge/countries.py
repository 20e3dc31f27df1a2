"""The ``countries`` demo graph: countries, capitals, borders, currencies and regions, from the countryinfo package.

Built offline from the JSON files countryinfo ships (in about 0.1 s, so it is built, not cached
on disk). Currencies are ISO 4217 codes (``EUR``), as countryinfo gives them.
"""

from __future__ import annotations

from typing import Any

from workbench.knowledge.graph import KnowledgeGraph

# The relations the graph uses, as they read in a prompt.
CAPITAL, BORDERS, CURRENCY, REGION, SUBREGION = "capital", "borders", "currency", "region", "subregion"
# Names in the data that are more often plain English words: Iceland's native name (Ísland), the Maldives'
# capital (Malé), Poland's demonym.
NOT_NAMES = ("island", "male", "polish")


def _is_code(text: str) -> bool:
    return 2 <= len(text) <= 3 and text.isascii() and text.isalpha() and text.isupper()


def countries() -> KnowledgeGraph:
    """The demo graph: one node per country, capital, currency code, region and subregion."""
    from countryinfo import CountryInfo

    data: dict[str, Any] = CountryInfo.all()
    by_iso3 = {
        info["ISO"]["alpha3"]: info["name"] for info in data.values() if (info.get("ISO") or {}).get("alpha3")
    }
    triples: list[tuple[str, str, str]] = []
    aliases: dict[str, str] = {}
    codes: dict[str, str] = {}
    bordering: set[frozenset[str]] = set()
    for info in sorted(data.values(), key=lambda i: str(i["name"])):
        country = info["name"]
        capital = info.get("capital")
        for city in [capital] if isinstance(capital, str) else capital or ():  # Vatican City's is a list
            if city:
                triples.append((country, CAPITAL, city))
        for code in info.get("borders") or ():
            neighbour = by_iso3.get(code)
            pair = frozenset((country, neighbour))
            if neighbour and neighbour != country and pair not in bordering:  # borders go both ways: say it once
                bordering.add(pair)
                triples.append((country, BORDERS, neighbour))
        for currency in info.get("currencies") or ():
            triples.append((country, CURRENCY, currency))
            codes[currency] = currency
        if info.get("region"):
            triples.append((country, REGION, info["region"]))
        if info.get("subregion"):
            triples.append((country, SUBREGION, info["subregion"]))
        iso = info.get("ISO") or {}
        for key in ("alpha2", "alpha3"):
            if iso.get(key):
                codes.setdefault(str(iso[key]), country)
        for name in (info.get("nativeName"), *(info.get("altSpellings") or ()), info.get("demonym")):
            if not name:
                continue
            if _is_code(name):
                codes.setdefault(name, country)
            else:
                aliases.setdefault(name, country)
    return KnowledgeGraph(triples, aliases=aliases, codes=codes, name="countries", ignore=NOT_NAMES)
