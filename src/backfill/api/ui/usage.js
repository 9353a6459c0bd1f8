// The usage page: requests and tokens per bucket and per model, and what they cost, from the
// organization reports (`/v1/organization/usage/*`, `/v1/organization/costs`) the key may read:
// a project key its own project, an admin key every project.

import { report } from "/ui/api.js";
import { barChart } from "/ui/chart.js";
import { el, fill, money, number } from "/ui/dom.js";

const HOUR = 3600;
const DAY = 86400;

/** The ranges offered: hourly buckets for a day, daily ones beyond. */
export const RANGES = {
  "24h": { label: "Last 24 hours", width: "1h", seconds: HOUR, buckets: 24 },
  "7d": { label: "Last 7 days", width: "1d", seconds: DAY, buckets: 7 },
  "30d": { label: "Last 30 days", width: "1d", seconds: DAY, buckets: 30 },
};
export const DEFAULT_RANGE = "7d";

const TOKEN_PARTS = ["cached", "input", "output"];

/** `[start, end)` of a range in Unix seconds: whole local hours (days) up to now, the current
 * one included, so the first bucket starts on the hour (at midnight). */
function rangeWindow(range) {
  const now = new Date();
  const first = new Date(now);
  if (range.width === "1h") {
    first.setMinutes(0, 0, 0);
    first.setHours(first.getHours() - (range.buckets - 1));
  } else {
    first.setHours(0, 0, 0, 0);
    first.setDate(first.getDate() - (range.buckets - 1));
  }
  return { start: Math.floor(first.getTime() / 1000), end: Math.floor(now.getTime() / 1000) + 1 };
}

function bucketLabel(range, start, long = false) {
  if (range.width === "1h") {
    const at = new Date(start * 1000);
    const hour = at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return long ? `${at.toLocaleDateString([], { month: "short", day: "numeric" })} ${hour}` : hour;
  }
  // the middle of the bucket: a daylight-saving shift moves its start an hour off midnight
  const mid = new Date((start + DAY / 2) * 1000);
  return mid.toLocaleDateString([], long
    ? { weekday: "short", month: "short", day: "numeric" }
    : { month: "short", day: "numeric" });
}

// -- sums -------------------------------------------------------------------------------------

const micros = (value) => Math.round(Number(value) * 1e6);

/** Per-currency sums in integer micro-units: float sums of many small amounts drift. */
class Money {
  constructor() {
    this.by = new Map();
  }
  add(amount) {
    if (!amount) return;
    const cur = String(amount.currency || "");
    this.by.set(cur, (this.by.get(cur) || 0) + micros(amount.value));
  }
  get empty() {
    return this.by.size === 0;
  }
  text() {
    return [...this.by].map(([currency, m]) => money({ value: m / 1e6, currency })).join(" + ");
  }
  total() {
    let t = 0;
    for (const m of this.by.values()) t += m;
    return t;
  }
}

function tokens() {
  return { requests: 0, input: 0, cached: 0, output: 0 };
}

function addUsage(into, r) {
  into.requests += r.num_model_requests || 0;
  into.input += r.input_tokens || 0;
  into.cached += r.input_cached_tokens || 0;
  into.output += r.output_tokens || 0;
}

/** The model a cost line item names (`"<model>, batch"` or `"<model>, realtime"`). */
function lineModel(item) {
  if (!item) return null;
  const at = item.lastIndexOf(", ");
  return at < 0 ? item : item.slice(0, at);
}

function summarize(completions, embeddings, costs) {
  const buckets = completions.data.map((b) => ({ start: b.start_time, end: b.end_time, ...tokens() }));
  const at = new Map(buckets.map((b, i) => [b.start, i]));
  const models = new Map();
  const model = (name) => {
    const key = name ?? "(no model)";
    if (!models.has(key)) models.set(key, { name: key, ...tokens(), embeddings: false, paid: new Money(), list: new Money() });
    return models.get(key);
  };
  const total = tokens();
  for (const [answer, isEmbeddings] of [[completions, false], [embeddings, true]]) {
    for (const bucket of answer.data) {
      let i = at.get(bucket.start_time);
      if (i === undefined) {
        i = buckets.push({ start: bucket.start_time, end: bucket.end_time, ...tokens() }) - 1;
        at.set(bucket.start_time, i);
      }
      for (const r of bucket.results) {
        addUsage(buckets[i], r);
        addUsage(total, r);
        const m = model(r.model);
        addUsage(m, r);
        if (isEmbeddings) m.embeddings = true;
      }
    }
  }
  buckets.sort((a, b) => a.start - b.start);

  const lines = new Map();
  const paid = new Money();
  const list = new Money();
  for (const bucket of costs.data) {
    for (const r of bucket.results) {
      const realtime = r.list_amount || r.amount; // without the extension: as billed
      const key = `${r.line_item}\u0000${r.amount.currency}`;
      if (!lines.has(key)) {
        lines.set(key, { item: r.line_item, quantity: 0, unit: r.quantity_unit, paid: new Money(), list: new Money() });
      }
      const line = lines.get(key);
      line.quantity += r.quantity || 0;
      line.paid.add(r.amount);
      line.list.add(realtime);
      paid.add(r.amount);
      list.add(realtime);
      const m = model(lineModel(r.line_item));
      m.paid.add(r.amount);
      m.list.add(realtime);
    }
  }
  const byName = (a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
  return {
    buckets,
    total,
    models: [...models.values()].sort(byName),
    lines: [...lines.values()].sort((a, b) => String(a.item).localeCompare(String(b.item))),
    paid,
    list,
  };
}

// -- views ------------------------------------------------------------------------------------

function headline(s) {
  if (s.paid.empty) {
    return el("p", { class: "headline muted", "data-costs": "none" },
      s.total.requests ? "No priced usage in this range: models without a price show tokens only."
        : "No usage in this range.");
  }
  const saved = s.list.total() - s.paid.total();
  const one = s.paid.by.size === 1 && s.list.by.size === 1;
  const savedText = one && saved > 0
    ? ` (saved ${money({ value: saved / 1e6, currency: [...s.paid.by.keys()][0] })}` +
      `, ${Math.round((100 * saved) / s.list.total())}%)`
    : "";
  return el("p", { class: "headline" },
    "You paid ", el("strong", { "data-costs": "paid" }, s.paid.text()),
    ", real time would have cost ", el("strong", { "data-costs": "list" }, s.list.text()),
    el("span", { class: "muted" }, savedText), ".");
}

function tiles(t) {
  const rows = [
    ["Requests", t.requests, "requests"],
    ["Input tokens", t.input, "input"],
    ["Cached input tokens", t.cached, "cached"],
    ["Output tokens", t.output, "output"],
  ];
  return el("dl", { class: "tiles" }, rows.map(([label, value, key]) =>
    el("div", { class: "tile" }, el("dt", {}, label), el("dd", { "data-total": key }, number(value)))));
}

function charts(range, s) {
  const per = range.width === "1h" ? "hour" : "day";
  const requests = barChart(s.buckets.map((b) => ({
    label: bucketLabel(range, b.start),
    title: `${bucketLabel(range, b.start, true)}: ${number(b.requests)} requests`,
    parts: [b.requests],
  })), { name: `Requests per ${per}`, classes: ["requests"] });
  const toks = barChart(s.buckets.map((b) => ({
    label: bucketLabel(range, b.start),
    title: `${bucketLabel(range, b.start, true)}: ${number(b.input)} input (${number(b.cached)} cached) · ` +
      `${number(b.output)} output tokens`,
    parts: [b.cached, Math.max(0, b.input - b.cached), b.output],
  })), { name: `Tokens per ${per}`, classes: TOKEN_PARTS });
  const legend = el("p", { class: "legend small muted" },
    [["cached", "cached input"], ["input", "input"], ["output", "output"]].map(([cls, text]) =>
      el("span", {}, el("span", { class: `swatch part-${cls}` }), text)));
  return el("div", { class: "grid even" },
    el("div", { class: "card", id: "usage-requests" }, el("h2", {}, `Requests per ${per}`), requests),
    el("div", { class: "card", id: "usage-tokens" }, el("h2", {}, `Tokens per ${per}`), toks, legend));
}

function costCells(m) {
  if (m.paid.empty) {
    return [el("td", { class: "num muted", "data-cost": "none" }, "no price"), el("td", { class: "num muted" }, "–")];
  }
  return [
    el("td", { class: "num", "data-cost": "paid" }, m.paid.text()),
    el("td", { class: "num muted", "data-cost": "list" }, m.list.text()),
  ];
}

function modelsTable(s) {
  if (!s.models.length) return el("p", { class: "muted" }, "No usage in this range.");
  const dash = (m, v) => (m.embeddings && !v ? "–" : number(v));
  return el("table", { class: "usage-models" },
    el("thead", {}, el("tr", {}, ["Model", "Requests", "Input", "Cached", "Output", "Paid", "Real time"]
      .map((h, i) => el("th", { class: i ? "num" : null }, h)))),
    el("tbody", {}, s.models.map((m) => el("tr", { "data-model": m.name },
      el("td", {}, el("code", {}, m.name)),
      el("td", { class: "num", "data-field": "requests" }, number(m.requests)),
      el("td", { class: "num", "data-field": "input" }, number(m.input)),
      el("td", { class: "num", "data-field": "cached" }, dash(m, m.cached)),
      el("td", { class: "num", "data-field": "output" }, dash(m, m.output)),
      costCells(m)))),
    el("tfoot", {}, el("tr", {},
      el("th", {}, "Total"),
      ["requests", "input", "cached", "output"].map((k) => el("td", { class: "num" }, number(s.total[k]))),
      s.paid.empty ? [el("td"), el("td")] : [
        el("td", { class: "num" }, s.paid.text()), el("td", { class: "num muted" }, s.list.text())])),
  );
}

function costsTable(s) {
  if (!s.lines.length) {
    return el("p", { class: "muted" }, "Nothing priced in this range. A model is priced by a [prices.<model>] table in the server's config.");
  }
  return el("table", { class: "usage-costs" },
    el("thead", {}, el("tr", {}, ["Line item", "Tokens", "Paid", "Real time", "Saved"]
      .map((h, i) => el("th", { class: i ? "num" : null }, h)))),
    el("tbody", {}, s.lines.map((l) => {
      const saved = l.list.total() - l.paid.total();
      const currency = [...l.paid.by.keys()][0];
      return el("tr", { "data-line-item": l.item },
        el("td", {}, l.item),
        el("td", { class: "num" }, number(l.quantity)),
        el("td", { class: "num", "data-cost": "paid" }, l.paid.text()),
        el("td", { class: "num muted", "data-cost": "list" }, l.list.text()),
        el("td", { class: "num muted" }, saved > 0 ? money({ value: saved / 1e6, currency }) : "–"));
    })),
    el("tfoot", {}, el("tr", {},
      el("th", {}, "Total"), el("td"),
      el("td", { class: "num", "data-cost": "paid" }, s.paid.text()),
      el("td", { class: "num muted", "data-cost": "list" }, s.list.text()), el("td"))),
  );
}

function rangeSwitch(current) {
  return el("nav", { class: "segmented", "aria-label": "range" },
    Object.entries(RANGES).map(([key, r]) =>
      el("a", { href: `#/usage/${key}`, "data-range": key, class: key === current ? "active" : null,
        "aria-current": key === current ? "page" : null }, r.label)));
}

export function showUsage(root, rangeKey, ctx) {
  const key = RANGES[rangeKey] ? rangeKey : DEFAULT_RANGE;
  const range = RANGES[key];
  const body = el("div", { id: "usage", "data-range": key }, el("p", { class: "muted" }, "Loading…"));
  fill(root,
    el("div", { class: "page-head" }, el("h1", {}, "Usage"), rangeSwitch(key)),
    body);
  ctx.every(10_000, async () => {
    const { start, end } = rangeWindow(range);
    const usageParams = { start_time: start, end_time: end, bucket_width: range.width, group_by: "model" };
    const [completions, embeddings, costs] = await Promise.all([
      report("usage/completions", usageParams),
      report("usage/embeddings", usageParams),
      report("costs", { start_time: start, end_time: end, bucket_width: "1d", group_by: "line_item" }),
    ]);
    if (!ctx.live()) return;
    const s = summarize(completions, embeddings, costs);
    const partial = !(completions.complete && embeddings.complete && costs.complete);
    body.dataset.start = String(start);
    body.dataset.end = String(end);
    body.dataset.width = range.width;
    fill(body,
      el("div", { class: "card", id: "usage-summary" },
        headline(s),
        tiles(s.total),
        el("p", { class: "muted small" },
          `${bucketLabel(range, start, true)} to now, ${range.width === "1h" ? "hourly" : "daily"} buckets, local time.`,
          partial ? " Only the first pages of the report are shown." : "")),
      charts(range, s),
      el("div", { class: "card" }, el("h2", {}, "By model"), modelsTable(s)),
      el("div", { class: "card" }, el("h2", {}, "Costs"),
        el("p", { class: "muted small" }, "Batch work is billed at the batch price; real time is what the same tokens cost at the real-time price."),
        costsTable(s)),
    );
  });
}
