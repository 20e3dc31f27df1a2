// Trace viewer: an interactive waterfall of spans beside their table (an anywidget ES module).
//
// The Python side (workbench.notebook.widgets.TraceViewer) sends `spans`, already in tree order,
// each {id, parent, trace, name, kind, depth, start_ms, duration_ms, queue_ms, gc_ms, status, attributes},
// and `colours` by span kind. Clicking a bar or a row sets `selected` (a span id) for the kernel.
// No imports and no build step: the module runs as it is, offline.

const SVG = "http://www.w3.org/2000/svg";
export const ROW_HEIGHT = 18;
export const LABEL_WIDTH = 220;
const INDENT = 12;
const FALLBACK_COLOUR = "#999999";

/** A tick step of 1, 2 or 5 times a power of ten giving about `target` ticks over `total` ms. */
export function tickStep(total, target = 6) {
  if (!(total > 0)) return 1;
  const raw = total / target;
  const power = 10 ** Math.floor(Math.log10(raw));
  for (const factor of [1, 2, 5, 10]) {
    if (raw <= factor * power) return factor * power;
  }
  return 10 * power;
}

/** Where each span's bar goes: one row per span, x in pixels over `width` for the whole time range. */
export function layout(spans, width) {
  const end = spans.reduce((m, s) => Math.max(m, s.start_ms + s.duration_ms), 0);
  const total = end > 0 ? end : 1;
  const scale = width / total;
  const bars = spans.map((s, row) => {
    const queue = Math.min(Math.max(s.queue_ms || 0, 0), s.duration_ms);
    return {
      id: s.id,
      row,
      y: row * ROW_HEIGHT,
      x: s.start_ms * scale,
      // A zero-length span still gets a visible sliver to hover and click.
      width: Math.max(s.duration_ms * scale, 1.5),
      queueWidth: queue * scale,
      indent: s.depth * INDENT,
    };
  });
  return { total, scale, bars, height: spans.length * ROW_HEIGHT };
}

/** Milliseconds as the tables show them: one decimal, thousands separated (1,290.5). */
export function ms(value) {
  return value.toLocaleString("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 });
}

/** A number as the tables show it: ms to one decimal, seconds to three, others to three significant digits. */
export function roundFor(key, value) {
  if (typeof value !== "number" || !Number.isFinite(value) || Number.isInteger(value)) return value;
  if (key.endsWith("_ms")) return +value.toFixed(1);
  if (key.endsWith("_s")) return +value.toFixed(3);
  return Math.abs(value) >= 100 ? Math.round(value) : +value.toPrecision(3);
}

/** The hover text of a span: its name, timing and every attribute, one per line, numbers rounded. */
export function describe(span) {
  const lines = [
    `${span.name}  [${span.kind}]  ${span.status}`,
    `start ${ms(span.start_ms)} ms, duration ${ms(span.duration_ms)} ms`,
  ];
  // Time the garbage collector stopped every thread while this span was open.
  if (span.gc_ms >= 0.05) lines.push(`garbage collection ${ms(span.gc_ms)} ms of it`);
  for (const [key, raw] of Object.entries(span.attributes || {})) {
    const value = Array.isArray(raw) ? raw.map((v) => roundFor(key, v)) : roundFor(key, raw);
    const text = typeof value === "string" ? value : JSON.stringify(value);
    lines.push(`${key} = ${text.length > 160 ? text.slice(0, 157) + "..." : text}`);
  }
  return lines.join("\n");
}

function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  return node;
}

function html(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function draw(model, el) {
  const spans = model.get("spans") || [];
  const colours = model.get("colours") || {};
  el.replaceChildren();
  const root = html("div", "wb-trace");
  el.appendChild(root);
  root.appendChild(html("div", "wb-trace-title", model.get("title") || `${spans.length} spans`));
  if (!spans.length) {
    root.appendChild(html("div", "wb-trace-empty", "no spans yet"));
    return () => {};
  }
  const body = html("div", "wb-trace-body");
  root.appendChild(body);

  const plotWidth = 560;
  const { total, bars, height } = layout(spans, plotWidth);
  const axisHeight = 20;
  const chartWidth = LABEL_WIDTH + plotWidth + 60;
  const chart = svg("svg", {
    class: "wb-waterfall",
    width: chartWidth,
    height: height + axisHeight,
    role: "img",
  });
  const step = tickStep(total);
  for (let t = 0; t <= total + 1e-9; t += step) {
    const x = LABEL_WIDTH + (t / total) * plotWidth;
    chart.appendChild(svg("line", { class: "wb-tick", x1: x, x2: x, y1: axisHeight - 4, y2: axisHeight + height }));
    const label = svg("text", { class: "wb-tick-label", x, y: axisHeight - 7, "text-anchor": "middle" });
    label.textContent = `${+t.toFixed(3)} ms`;
    chart.appendChild(label);
  }

  // The tooltip lives beside the scrolling pane, not in it, so the pane's edge never clips it.
  const chartWrap = html("div", "wb-chart-wrap");
  const chartPane = html("div", "wb-chart-pane");
  const tooltip = html("pre", "wb-tooltip");
  tooltip.hidden = true;
  const table = html("table", "wb-span-table");
  const head = html("tr");
  for (const column of ["span", "kind", "start ms", "ms", "status"]) head.appendChild(html("th", "", column));
  table.appendChild(head);

  const rowsById = new Map();
  const barsById = new Map();
  const select = (id) => {
    model.set("selected", id);
    model.save_changes();
  };

  spans.forEach((span, index) => {
    const bar = bars[index];
    const y = axisHeight + bar.y;
    const colour = colours[span.kind] || FALLBACK_COLOUR;
    const group = svg("g", { class: "wb-bar", "data-span-id": span.id, "data-kind": span.kind });
    // The whole row answers the pointer, not only the painted bits: a short bar is a sliver, and
    // between the name and the bar there would be nothing to hover or click.
    group.appendChild(svg("rect", { class: "wb-hit", x: 0, y, width: chartWidth, height: ROW_HEIGHT }));
    const name = svg("text", { class: "wb-label", x: 4 + bar.indent, y: y + ROW_HEIGHT / 2 + 4 });
    name.textContent = span.name;
    group.appendChild(name);
    if (bar.queueWidth > 0) {
      group.appendChild(svg("rect", {
        class: "wb-queue", x: LABEL_WIDTH + bar.x, y: y + 3, width: bar.queueWidth, height: ROW_HEIGHT - 6,
        stroke: colour,
      }));
    }
    group.appendChild(svg("rect", {
      class: span.status === "ERROR" ? "wb-rect wb-error" : "wb-rect",
      x: LABEL_WIDTH + bar.x + bar.queueWidth, y: y + 3,
      width: Math.max(bar.width - bar.queueWidth, 1.5), height: ROW_HEIGHT - 6, fill: colour,
    }));
    const duration = svg("text", { class: "wb-duration", x: LABEL_WIDTH + bar.x + bar.width + 3, y: y + ROW_HEIGHT / 2 + 4 });
    duration.textContent = `${ms(span.duration_ms)} ms`;
    group.appendChild(duration);
    group.addEventListener("mouseenter", (event) => {
      tooltip.textContent = describe(span);
      tooltip.hidden = false;
      placeTooltip(tooltip, chartWrap, event);
    });
    group.addEventListener("mouseleave", () => { tooltip.hidden = true; });
    group.addEventListener("click", () => select(span.id));
    chart.appendChild(group);
    barsById.set(span.id, group);

    const row = html("tr");
    row.dataset.spanId = span.id;
    const cell = html("td", "wb-name", span.name);
    cell.style.paddingLeft = `${4 + bar.indent}px`;
    row.append(
      cell,
      html("td", "", span.kind),
      html("td", "wb-num", ms(span.start_ms)),
      html("td", "wb-num", ms(span.duration_ms)),
      html("td", span.status === "ERROR" ? "wb-status-error" : "", span.status),
    );
    row.addEventListener("click", () => select(span.id));
    table.appendChild(row);
    rowsById.set(span.id, row);
  });

  chartPane.append(chart);
  chartWrap.append(chartPane, tooltip);
  const tablePane = html("div", "wb-table-pane");
  tablePane.appendChild(table);
  body.append(chartWrap, tablePane);

  const highlight = () => {
    const id = model.get("selected");
    for (const [key, row] of rowsById) row.classList.toggle("wb-selected", key === id);
    for (const [key, group] of barsById) group.classList.toggle("wb-selected", key === id);
    const row = rowsById.get(id);
    if (row && typeof row.scrollIntoView === "function") row.scrollIntoView({ block: "nearest" });
  };
  highlight();
  model.on("change:selected", highlight);
  return () => model.off("change:selected", highlight);
}

/**
 * Where the tooltip goes, in the chart's coordinates: below the pointer, or above it where the
 * window has no room below and the chart has room above. Never above the chart's top: the output
 * area scrolls sideways, so it also clips whatever sticks out at its top, while below it grows.
 */
export function tooltipPosition(pointer, tooltip, chartWidth, windowHeight) {
  const left = Math.max(0, Math.min(pointer.x + 16, chartWidth - tooltip.width));
  const roomBelow = pointer.clientY + 16 + tooltip.height <= windowHeight;
  const above = pointer.y - tooltip.height - 8;
  return { left, top: roomBelow || above < 0 ? pointer.y + 16 : above };
}

function placeTooltip(tooltip, wrap, event) {
  const box = wrap.getBoundingClientRect();
  const pointer = { x: event.clientX - box.left, y: event.clientY - box.top, clientY: event.clientY };
  const size = { width: tooltip.offsetWidth, height: tooltip.offsetHeight };
  const { left, top } = tooltipPosition(pointer, size, box.width, window.innerHeight);
  tooltip.style.left = `${left}px`;
  tooltip.style.top = `${top}px`;
}

function render({ model, el }) {
  let cleanup = draw(model, el);
  const redraw = () => {
    cleanup();
    cleanup = draw(model, el);
  };
  model.on("change:spans", redraw);
  model.on("change:title", redraw);
  return () => {
    cleanup();
    model.off("change:spans", redraw);
    model.off("change:title", redraw);
  };
}

export default { render };
