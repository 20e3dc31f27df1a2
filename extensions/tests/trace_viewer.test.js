// Tests of the trace viewer's pure parts (layout, ticks, hover text): `node --test extensions/tests/`.
import assert from "node:assert/strict";
import { test } from "node:test";

import viewer, { ROW_HEIGHT, describe, layout, ms, tickStep, tooltipPosition } from "../trace_viewer.js";

const span = (id, depth, start_ms, duration_ms, extra = {}) => ({
  id, parent: null, trace: "t", name: `span ${id}`, kind: "CHAIN", depth, start_ms, duration_ms,
  queue_ms: 0, status: "OK", attributes: {}, ...extra,
});

test("the module is an anywidget module: a default export with render", () => {
  assert.equal(typeof viewer.render, "function");
});

test("layout gives one bar per span, one row each, scaled to the width", () => {
  const spans = [span("a", 0, 0, 100), span("b", 1, 10, 40), span("c", 1, 50, 50)];
  const { total, bars, height } = layout(spans, 500);
  assert.equal(total, 100);
  assert.equal(bars.length, 3);
  assert.deepEqual(bars.map((b) => b.row), [0, 1, 2]);
  assert.equal(height, 3 * ROW_HEIGHT);
  assert.equal(bars[0].width, 500);
  assert.equal(bars[1].x, 50);
  assert.equal(bars[2].x + bars[2].width, 500);
  assert.ok(bars[1].indent > bars[0].indent, "children are indented under their parent");
});

test("queue wait is drawn inside the bar and never wider than it", () => {
  const { bars } = layout([span("a", 0, 0, 10, { queue_ms: 4 }), span("b", 0, 0, 10, { queue_ms: 50 })], 100);
  assert.equal(bars[0].queueWidth, 40);
  assert.equal(bars[1].queueWidth, bars[1].width);
});

test("a zero-length span still gets a bar wide enough to hover", () => {
  const { bars } = layout([span("a", 0, 0, 10), span("b", 1, 5, 0)], 100);
  assert.ok(bars[1].width >= 1.5);
});

test("dozens of concurrent runs lay out without overlap of rows", () => {
  const spans = [];
  for (let run = 0; run < 48; run++) {
    spans.push(span(`r${run}`, 0, run * 0.5, 30), span(`h${run}`, 1, run * 0.5 + 1, 20));
  }
  const { bars } = layout(spans, 600);
  assert.equal(new Set(bars.map((b) => b.y)).size, spans.length);
});

test("tick steps are 1, 2 or 5 times a power of ten", () => {
  assert.equal(tickStep(100), 20);
  assert.equal(tickStep(7), 2);
  assert.equal(tickStep(0.9), 0.2);
  assert.equal(tickStep(0), 1);
});

test("the hover text names the span and lists its attributes, long values cut", () => {
  const text = describe(span("a", 0, 1.5, 2.25, {
    kind: "LLM", attributes: { "gen_ai.request.temperature": 0.7, "input.value": "x".repeat(400), tags: ["stop"] },
  }));
  assert.match(text, /^span a {2}\[LLM\] {2}OK/);
  assert.match(text, /gen_ai\.request\.temperature = 0\.7/);
  assert.match(text, /tags = \["stop"\]/);
  assert.ok(text.split("\n").every((line) => line.length < 200));
  assert.doesNotMatch(text, /garbage collection/);  // no pause touched it
});

test("the hover text says how much of the span the garbage collector took", () => {
  const text = describe(span("a", 0, 1.5, 40, { gc_ms: 12.5 }));
  assert.match(text, /^garbage collection 12\.5 ms of it$/m);
});

test("the hover text rounds numbers as the tables do and leaves whole numbers and text alone", () => {
  const text = describe(span("a", 0, 1.23456, 40.06789, { attributes: {
    "workbench.queue_ms": 12.345678, "workbench.cold_start_s": 0.0371234567, "gen_ai.request.top_p": 0.912345,
    "workbench.batch.size": 7, "gen_ai.usage.output_tokens": 123456, "workbench.latencies_ms": [1.2345, 20.55],
    "output.value": "3.14159265",
  } }));
  assert.match(text, /^start 1\.2 ms, duration 40\.1 ms$/m);
  assert.match(text, /^workbench\.queue_ms = 12\.3$/m);
  assert.match(text, /^workbench\.cold_start_s = 0\.037$/m);
  assert.match(text, /^gen_ai\.request\.top_p = 0\.912$/m);
  assert.match(text, /^workbench\.batch\.size = 7$/m);
  assert.match(text, /^gen_ai\.usage\.output_tokens = 123456$/m);
  assert.match(text, /^workbench\.latencies_ms = \[1\.2,20\.6\]$/m);
  assert.match(text, /^output\.value = 3\.14159265$/m);  // text is what the model said: never rounded
});

test("milliseconds read as in the tables: one decimal, thousands separated, never in exponent form", () => {
  assert.equal(ms(1290.4567), "1,290.5");
  assert.equal(ms(0.04), "0.0");
  assert.equal(ms(12), "12.0");
  assert.equal(ms(1.5e7), "15,000,000.0");
});

test("the tooltip goes below the pointer, above it near the window's bottom, never above the chart's top", () => {
  const size = { width: 200, height: 120 };
  // Room below in the window: below the pointer.
  assert.deepEqual(tooltipPosition({ x: 50, y: 300, clientY: 300 }, size, 800, 900), { left: 66, top: 316 });
  // Near the window's bottom, with room above in the chart: above the pointer.
  assert.deepEqual(tooltipPosition({ x: 50, y: 300, clientY: 850 }, size, 800, 900), { left: 66, top: 172 });
  // Near the bottom of a short window but at the chart's top row: below, where the output area grows,
  // not above the chart's top, where the output area would cut it off.
  const top = tooltipPosition({ x: 50, y: 30, clientY: 850 }, size, 800, 900).top;
  assert.ok(top >= 0);
  assert.equal(top, 46);
  // Near the right edge: pulled left to stay inside the chart.
  assert.equal(tooltipPosition({ x: 780, y: 300, clientY: 300 }, size, 800, 900).left, 600);
});
