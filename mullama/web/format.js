// Numbers for people: sizes, durations, rates, dates.

/** Bytes as Ollama prints them: decimal units, "1.2 GB". */
export function bytes(count) {
  if (!Number.isFinite(count) || count < 0) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = count;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

/** Seconds as "45s", "3m 20s", "2h 5m". */
export function seconds(total) {
  if (!Number.isFinite(total) || total < 0) return "";
  const s = Math.round(total);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor(s / 60) % 60}m`;
}

/** A date relative to now: "in 4 minutes", "2 days ago". */
export function relative(date, now = Date.now()) {
  const time = new Date(date).getTime();
  if (!Number.isFinite(time)) return "";
  const delta = (time - now) / 1000;
  const format = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  const steps = [[60, "second"], [3600, "minute"], [86400, "hour"], [Infinity, "day"]];
  const sizes = { second: 1, minute: 60, hour: 3600, day: 86400 };
  for (const [limit, unit] of steps) {
    if (Math.abs(delta) < limit) return format.format(Math.round(delta / sizes[unit]), unit);
  }
  return "";
}

/** Ollama reports "kept loaded forever" as a date in 2318. */
export function isForever(date) {
  return new Date(date).getUTCFullYear() >= 2300;
}

/** Tokens per second from a token count and nanoseconds. */
export function rate(count, nanoseconds) {
  if (!count || !nanoseconds) return null;
  return count / (nanoseconds / 1e9);
}

/** A count with the reader's digit grouping: "12,345". */
export function count(value) {
  return Number.isFinite(value) ? Math.round(value).toLocaleString() : "";
}

/** A latency in seconds as "420 ms" or "1.3 s"; "–" when unknown. */
export function latency(value) {
  if (!Number.isFinite(value)) return "–";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  return `${value.toFixed(value < 10 ? 2 : 1)} s`;
}
