// The Statistics page: requests, tokens and latency per hour from GET /api/stats,
// as charts (charts.js) with tables beside them, refreshed every few seconds.

import { ApiError, get } from "./api.js";
import { timeChart } from "./charts.js";
import { field, h, replace, table } from "./dom.js";
import { count, latency } from "./format.js";

const REFRESH_MS = 5000;
const HOUR_MS = 3600 * 1000;
const PERIODS = [
  { since: "24h", label: "Last 24 hours" },
  { since: "7d", label: "Last 7 days" },
];
const PERCENTILES = ["p50", "p90", "p99"];

/** Render the statistics page into `root`; returns the function that stops its refreshing. */
export function statsPage(root) {
  const period = h("select", { id: "stats-period", on: { change: () => refresh() } },
    PERIODS.map((p) => h("option", { value: p.since, text: p.label })));
  const model = h("select", { id: "stats-model", on: { change: () => refresh() } },
    h("option", { value: "", text: "All models" }));
  const updated = h("p", { class: "muted", id: "stats-updated" });
  const status = h("p", { class: "error", role: "alert", id: "stats-error" });
  const content = h("div", { id: "stats-content" }, h("p", { class: "muted", text: "Loading…" }));
  replace(root, h("div", { class: "page stats" },
    h("h1", { text: "Statistics" }),
    h("div", { class: "row wrap stats-controls" },
      field("Period", period), field("Model", model),
      h("button", { type: "button", id: "stats-refresh", text: "Refresh", on: { click: () => refresh() } }),
      updated),
    status, content));
  let timer = 0;
  let stopped = false;
  refresh();

  async function refresh() {
    clearTimeout(timer);
    const since = period.value;
    const filter = model.value ? `&model=${encodeURIComponent(model.value)}` : "";
    try {
      const [hourly, perModel] = await Promise.all([
        get(`/api/stats?since=${since}&by=hour${filter}`),
        get(`/api/stats?since=${since}&by=model`),
      ]);
      if (stopped) return;
      status.textContent = "";
      renderModelChoice(perModel.stats || []);
      render(hourly, perModel.stats || []);
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      if (stopped) return;
      status.textContent = explain(error);
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }

  function renderModelChoice(rows) {
    const chosen = model.value;
    const names = rows.map((row) => row.model).sort();
    if (chosen && !names.includes(chosen)) names.unshift(chosen);
    const current = [...model.options].slice(1).map((option) => option.value);
    if (current.join("\n") === names.join("\n")) return;
    replace(model, h("option", { value: "", text: "All models" }), names.map((name) => h("option", { value: name, text: name })));
    model.value = chosen;
  }

  function render(hourly, perModel) {
    // A refresh must not fold a table the reader opened.
    const open = new Set([...content.querySelectorAll("details[open]")].map((details) => details.id));
    const label = PERIODS.find((p) => p.since === period.value)?.label.toLowerCase() || "this period";
    const buckets = hoursBetween(hourly.since, hourly.until);
    const rows = new Map((hourly.stats || []).map((row) => [Date.parse(row.hour), row]));
    const at = (pick) => buckets.map((bucket) => {
      const row = rows.get(bucket.time);
      return row ? pick(row) : null;
    });
    const total = hourly.total || { requests: 0, errors: 0, prompt_tokens: 0, generated_tokens: 0, latency_seconds: {} };
    const ok = at((row) => row.requests - row.errors).map((v) => v || 0);
    const errors = at((row) => row.errors).map((v) => v || 0);
    const prompt = at((row) => row.prompt_tokens).map((v) => v || 0);
    const generated = at((row) => row.generated_tokens).map((v) => v || 0);
    const busiest = busiestHour(buckets, ok.map((v, i) => v + errors[i]));
    replace(content,
      totals(total),
      h("div", { class: "charts" },
        timeChart({ id: "chart-requests", title: "Requests per hour", kind: "bars", buckets, integer: true, format: count,
          series: [{ name: "Succeeded", values: ok }, { name: "Failed", tone: "bad", values: errors }],
          summary: `${count(total.requests)} requests in the ${label}, ${count(total.errors)} failed${busiest}.` }),
        timeChart({ id: "chart-tokens", title: "Tokens per hour", kind: "bars", buckets, integer: true, format: count,
          series: [{ name: "Prompt", values: prompt }, { name: "Generated", tone: 2, values: generated }],
          summary: `${count(total.prompt_tokens)} prompt tokens read and ${count(total.generated_tokens)} tokens `
            + `generated in the ${label}.` }),
        timeChart({ id: "chart-latency", title: "Latency per hour", kind: "lines", buckets, format: latency,
          series: PERCENTILES.map((p, index) => ({ name: p, tone: [0, 2, 1][index], values: at((row) => row.latency_seconds?.[p] ?? null) })),
          rowFilter: (index) => rows.has(buckets[index].time),
          summary: `Request latency percentiles per hour in the ${label}; over the whole period the median is `
            + `${latency(total.latency_seconds?.p50)} and the 99th percentile ${latency(total.latency_seconds?.p99)}.` })),
      modelTable(perModel));
    for (const id of open) document.getElementById(id)?.setAttribute("open", "");
  }

  function totals(total) {
    const lat = total.latency_seconds || {};
    const items = [
      ["requests", "Requests", count(total.requests)],
      ["errors", "Failed", count(total.errors)],
      ["prompt_tokens", "Prompt tokens", count(total.prompt_tokens)],
      ["generated_tokens", "Generated tokens", count(total.generated_tokens)],
      ["p50", "Median latency", latency(lat.p50)],
      ["p99", "99th percentile", latency(lat.p99)],
    ];
    return h("dl", { class: "totals", id: "stats-totals" }, items.map(([key, name, value]) =>
      h("div", { class: "total", "data-stat": key }, h("dt", { text: name }), h("dd", { text: value }))));
  }

  function modelTable(rows) {
    const body = rows.map((row) => h("tr", { "data-model": row.model },
      h("th", { scope: "row", text: row.model }),
      h("td", { class: "num", text: count(row.requests) }),
      h("td", { class: "num", text: count(row.errors) }),
      h("td", { class: "num", text: count(row.prompt_tokens) }),
      h("td", { class: "num", text: count(row.generated_tokens) }),
      PERCENTILES.map((p) => h("td", { class: "num", text: latency(row.latency_seconds?.[p]) }))));
    return h("section", { class: "card", id: "stats-models", "aria-labelledby": "stats-models-title" },
      h("h2", { id: "stats-models-title", text: "Per model" }),
      body.length ? table(["Model", "Requests", "Failed", "Prompt tokens", "Generated tokens", "p50", "p90", "p99"],
        body, "Statistics per model")
        : h("p", { class: "muted", text: "No requests in this period yet." }));
  }

  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

/** One bucket per hour from the hour holding `since` to the one holding `until`, in the reader's time zone. */
function hoursBetween(since, until) {
  const first = Math.floor(Date.parse(since) / HOUR_MS) * HOUR_MS;
  const last = Math.floor(Date.parse(until) / HOUR_MS) * HOUR_MS;
  const buckets = [];
  const clock = new Intl.DateTimeFormat(undefined, { hour: "numeric" });
  const day = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
  const long = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "numeric", minute: "2-digit" });
  const days = (last - first) / HOUR_MS > 48;
  for (let time = first; time <= last; time += HOUR_MS) {
    const date = new Date(time);
    const midnight = date.getHours() === 0;
    let tick = clock.format(date);
    if (days) tick = midnight ? day.format(date) : null;
    buckets.push({ time, tick, long: long.format(date) });
  }
  return buckets;
}

function busiestHour(buckets, values) {
  const top = Math.max(0, ...values);
  if (!top) return "";
  return `; the busiest hour, ${buckets[values.indexOf(top)].long}, had ${count(top)}`;
}

function explain(error) {
  if (error instanceof ApiError && error.status === 503) return `Statistics are off: ${error.message}`;
  if (error instanceof ApiError && error.status === 403) {
    return `This API key may not read statistics (it needs the metrics or admin scope): ${error.message}`;
  }
  return `Could not read /api/stats: ${error.message}`;
}
