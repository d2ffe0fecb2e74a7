// Charts over time as hand-written SVG: stacked bars (counts) and lines (latency).
//
// A chart is a <figure>: its title, an SVG the screen reader reads as one
// image with a summary (role="img", <title>, <desc>), a legend, and the same
// numbers as a table under a disclosure. Colours come from CSS classes, so
// the chart follows the light and dark themes and needs no inline style.

import { h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 560;
const HEIGHT = 200;
const MARGIN = { top: 10, right: 18, bottom: 24, left: 58 };
// Bucket counts between x-axis labels, from which the smallest giving at most 8 labels is taken.
const LABEL_STEPS = [1, 2, 3, 4, 6, 12, 24, 48, 72, 168];

let nextId = 0;

/** Create an SVG element; attributes as given, children appended (strings become text). */
export function s(tag, attributes = {}, ...children) {
  const element = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined) element.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) element.append(child);
  }
  return element;
}

/** The colour class of a series. */
function tone(series, index) {
  return `series-${series.tone ?? index}`;
}

/** The smallest "round" step (1, 2 or 5 times a power of ten) at least `rough`; whole numbers when `integer`. */
function niceStep(rough, integer) {
  if (!(rough > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * power).find((candidate) => candidate >= rough);
  return integer ? Math.max(1, Math.ceil(step)) : step;
}

/** The y axis: its top and the values of its grid lines, for data up to `max`. */
export function yAxis(max, integer) {
  const step = niceStep(max / 4, integer);
  const top = Math.max(step, Math.ceil(max / step) * step);
  const ticks = [];
  for (let value = 0; value <= top + step / 2; value += step) ticks.push(Number(value.toPrecision(12)));
  return { top, ticks };
}

/**
 * A chart over time buckets.
 *
 * spec:
 *   id, title           the figure's id and visible title
 *   kind                "bars" (series stacked) or "lines" (null values leave gaps)
 *   buckets             [{ label: "13:00", long: "3 Dec, 13:00", tick: "13:00" }]: each bucket's names
 *   series              [{ name, tone, values: [number|null, ...] }], one value per bucket; `tone` picks the
 *                       colour (0, 1, 2 or "bad"; default: the series' place)
 *   format(value)       how a value reads ("12", "0.41 s")
 *   integer             whether the values are whole numbers (the grid steps then are too)
 *   summary             one sentence for screen readers: what the chart shows
 *   rowFilter(index)    whether a bucket gets a row in the table (default: any non-zero value)
 */
export function timeChart({ id, title, kind, buckets, series, format, integer = false, summary, rowFilter }) {
  const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
  const plotHeight = HEIGHT - MARGIN.top - MARGIN.bottom;
  const count = Math.max(buckets.length, 1);
  const slot = plotWidth / count;
  const totals = buckets.map((_, index) => series.map((one) => one.values[index] ?? 0)
    .reduce((a, b) => (kind === "bars" ? a + b : Math.max(a, b)), 0));
  const { top, ticks } = yAxis(Math.max(0, ...totals), integer);
  const y = (value) => MARGIN.top + plotHeight - (value / top) * plotHeight;
  const x = (index) => MARGIN.left + slot * index;
  const titleId = `chart-title-${++nextId}`;
  const descId = `chart-desc-${nextId}`;

  const grid = ticks.map((value) => s("g", { class: "tick" },
    s("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(value), y2: y(value), class: "grid" }),
    s("text", { x: MARGIN.left - 6, y: y(value), class: "axis y", "text-anchor": "end", "dominant-baseline": "middle" },
      format(value))));
  // Sparse ticks (one a day) all show; one per bucket are thinned to at most 8.
  const ticked = buckets.filter((bucket) => bucket.tick).length;
  const every = ticked <= 8 ? 1 : LABEL_STEPS.find((step) => count / step <= 8) || count;
  const labels = buckets.map((bucket, index) => (bucket.tick && index % every === 0
    ? s("text", { x: x(index) + slot / 2, y: HEIGHT - 8, class: "axis x", "text-anchor": "middle" }, bucket.tick)
    : null));
  const marks = kind === "bars" ? bars() : lines();

  const svg = s("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-labelledby": titleId,
    "aria-describedby": descId, class: `chart ${kind}`, focusable: "false" },
  s("title", { id: titleId }, title),
  s("desc", { id: descId }, summary),
  s("g", { class: "grid-lines" }, grid),
  s("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(0), y2: y(0), class: "baseline" }),
  s("g", { class: "labels" }, labels),
  marks);

  const legend = h("ul", { class: "legend", "aria-hidden": "true" },
    series.map((one, index) => h("li", {}, h("span", { class: `swatch ${tone(one, index)}` }), one.name)));
  const keep = rowFilter || ((index) => series.some((one) => one.values[index]));
  const rows = buckets.map((bucket, index) => (keep(index) ? h("tr", {},
    h("th", { scope: "row", text: bucket.long }),
    series.map((one) => h("td", { class: "num", text: one.values[index] == null ? "–" : format(one.values[index]) })))
    : null)).filter(Boolean);
  const tableView = h("details", { class: "chart-table", id: `${id}-table` },
    h("summary", { text: `${title} as a table` }),
    rows.length ? h("table", {},
      h("caption", { class: "sr-only", text: title }),
      h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Hour" }),
        series.map((one) => h("th", { scope: "col", class: "num", text: one.name })))),
      h("tbody", {}, rows))
      : h("p", { class: "muted", text: "Nothing in this period." }));

  return h("figure", { class: "card chart-card", id },
    h("figcaption", { text: title }), svg, legend, tableView);

  function bars() {
    const width = Math.max(1, slot * 0.78);
    return s("g", { class: "marks" }, buckets.map((bucket, index) => {
      let base = 0;
      const rects = series.map((one, which) => {
        const value = one.values[index] || 0;
        if (!value) return null;
        const rect = s("rect", { x: x(index) + (slot - width) / 2, y: y(base + value), width,
          height: Math.max(1, y(base) - y(base + value)), class: tone(one, which), "data-value": value });
        base += value;
        return rect;
      });
      if (!base) return null;
      const parts = series.map((one) => `${one.name} ${format(one.values[index] || 0)}`).join(", ");
      return s("g", { class: "bucket", "data-index": index, "data-total": base },
        s("title", {}, `${bucket.long}: ${parts}`), rects);
    }));
  }

  function lines() {
    return s("g", { class: "marks" }, series.map((one, which) => {
      let path = "";
      let open = false;
      const dots = [];
      one.values.forEach((value, index) => {
        if (value == null) {
          open = false;
          return;
        }
        const px = x(index) + slot / 2;
        path += `${open ? "L" : "M"}${px.toFixed(1)},${y(value).toFixed(1)}`;
        open = true;
        dots.push(s("circle", { cx: px, cy: y(value), r: 4, class: tone(one, which), "data-value": value },
          s("title", {}, `${buckets[index].long}: ${one.name} ${format(value)}`)));
      });
      return s("g", { class: `line ${tone(one, which)}` }, path ? s("path", { d: path }) : null, dots);
    }));
  }
}
