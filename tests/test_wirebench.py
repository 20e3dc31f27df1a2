"""The wire benchmark's measuring code, run small: what a tutorial cell calls (figures are never asserted)."""

from __future__ import annotations

import pytest

import workbench as wb
from workbench.fronts.server import wirebench


def test_formats_compare_every_format_on_both_payloads() -> None:
    table = wirebench.formats(repeats=1, number=2)  # raises if a format does not give its payload back
    assert set(table["payload"]) == {"small request", "large response"}
    assert set(table["format"]) == {"json (stdlib)", "json (msgspec)", "msgpack (msgspec)", "json+zstd",
                                    "msgpack+zstd", "protobuf"}
    size = table.set_index(["payload", "format"])["bytes"]
    assert size["small request", "protobuf"] < size["small request", "json (msgspec)"]
    assert size["large response", "json+zstd"] < size["large response", "json (msgspec)"] / 2  # prose compresses


def test_wires_serve_both_chains_on_every_wire_and_match_each_answer(tiny_bench: wb.Workbench) -> None:
    results = wirebench.wires(tiny_bench, requests=4, concurrency=2, rounds=1, warmup=1)
    table = results.table()
    assert sorted(zip(table["chain"], table["wire"])) == sorted(
        (chain, wire) for chain in ("served", "noop") for wire in (*wirebench.WIRES, wirebench.IN_PROCESS))
    assert (table["calls"] == 4).all() and (table["errors"] == 0).all()
    assert table.set_index("wire").loc["gRPC/protobuf", "claimed_mean_ms"].tolist() == [6.0, 6.0]
    assert "REST/JSON p50 / gRPC p50" in results.headline()


def test_wires_run_where_a_loop_already_runs_as_in_a_notebook_cell(tiny_bench: wb.Workbench) -> None:
    """A notebook cell runs inside the kernel's event loop, where asyncio.run refuses: the in-process arm moves aside."""
    import asyncio

    async def cell() -> wirebench.WireResults:
        return wirebench.wires(tiny_bench, requests=2, concurrency=1, rounds=1, warmup=0)

    table = asyncio.run(cell()).table()
    assert (table["errors"] == 0).all() and (table["calls"] == 2).all()


def test_wires_spawn_their_client_where_main_has_no_spec(tiny_bench: wb.Workbench,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """IPython's shell (the magics, a kernel) sets a __main__ without __spec__, which multiprocessing's spawn reads."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    monkeypatch.delattr(sys.modules["__main__"], "__spec__")
    table = wirebench.wires(tiny_bench, requests=1, concurrency=1, rounds=1, warmup=0).table()
    assert (table["errors"] == 0).all() and (table["calls"] == 1).all()
