// The models page: each model's batch limit and in flight beside its real-time load.

import { modelLoads } from "/ui/api.js";
import { el, fill, number, seconds } from "/ui/dom.js";

const GOVERNOR = {
  off: "off (fixed limit)",
  starting: "starting",
  dormant: "dormant (no real time seen: at the ceiling)",
  idle: "idle (no real time: at the ceiling)",
  reference: "governing (planning for real-time peaks)",
};

function latency(l) {
  return l ? `${seconds(l.p50)} p50 · ${seconds(l.p90)} p90 (${number(l.samples)})` : "–";
}

function card(m) {
  const b = m.batch;
  const r = m.realtime;
  const g = m.governor;
  const rows = [
    ["Batch limit", b ? number(b.limit) : "–", "limit"],
    ["Batch in flight", b ? number(b.in_flight) : "–", "batch-in-flight"],
    ["Long prompts waiting", b ? number(b.deferred) : "–", "deferred"],
    ["Real time in flight", r ? number(r.in_flight) : "–", "realtime-in-flight"],
    ["Real-time requests", r ? number(r.requests) : "–", "realtime-requests"],
    ["TTFT (gateway)", r ? latency(r.ttft_seconds) : "–", "ttft"],
    ["TPOT (gateway)", r ? latency(r.tpot_seconds) : "–", "tpot"],
    ["Governor", g ? GOVERNOR[g.state] || g.state : "–", "governor"],
    ["Planned real-time peak", g && g.reference !== null ? g.reference.toFixed(1) : "–", "reference"],
    ["Engine metrics", g ? (g.engine_metrics ? "read" : "not read") : "–", "engine-metrics"],
  ];
  const share = b && b.limit ? Math.min(100, (100 * b.in_flight) / b.limit) : 0;
  const used = el("div", { class: "bar-done" });
  used.style.width = `${share.toFixed(1)}%`;
  return el("div", { class: "card model", "data-model": m.id },
    el("h2", {}, m.id),
    el("p", { class: "muted small" }, m.endpoints.join(" · ")),
    el("div", { class: "bar-track", title: "batch in flight of its limit" }, used),
    el("p", { class: "muted small" },
      b ? `${number(b.in_flight)} of ${number(b.limit)} batch slots in use` : "no batch dispatcher here"),
    el("dl", { class: "facts" }, rows.map(([label, value, key]) =>
      [el("dt", {}, label), el("dd", { "data-field": key }, value)])),
  );
}

export function showModels(root, ctx) {
  const list = el("div", { class: "models" });
  fill(root, el("h1", {}, "Models"), list);
  ctx.every(2000, async () => {
    const page = await modelLoads();
    if (!ctx.live()) return;
    fill(list, page.data.length ? page.data.map(card) : el("p", { class: "muted" }, "No models."));
  });
}
