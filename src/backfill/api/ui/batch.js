// One batch: progress, throughput over time (from the server), errors by code, downloads.

import { download, errorGroups, getBatch, throughput } from "/ui/api.js";
import { TERMINAL, cancelButton, cost, eta, progress, statusBadge, usage } from "/ui/batches.js";
import { throughputChart } from "/ui/chart.js";
import { duration, el, fill, number, time } from "/ui/dom.js";

function field(label, value) {
  return [el("dt", {}, label), el("dd", {}, value === "" || value === null ? "–" : value)];
}

function downloads(batch) {
  const files = [
    ["Input file", batch.input_file_id],
    ["Output file", batch.output_file_id],
    ["Error file", batch.error_file_id],
  ];
  return files.map(([label, id]) =>
    id
      ? el("button", {
          type: "button",
          class: "secondary small",
          "data-download": label.split(" ")[0].toLowerCase(),
          onclick: async (event) => {
            event.target.disabled = true;
            try {
              await download(id);
            } catch (e) {
              alert(e.message);
            }
            event.target.disabled = false;
          },
        }, `${label} ↓`)
      : el("span", { class: "muted small" }, `${label}: none`),
  );
}

function errorsView(groups) {
  if (!groups.data.length) {
    return el("p", { class: "muted" }, groups.complete ? "No errors." : "No errors so far.");
  }
  return [
    el("p", { class: "muted small" },
      `${number(groups.total)} error lines${groups.complete ? "" : " so far (recorded results)"}.`),
    el("table", { class: "errors" },
      el("thead", {}, el("tr", {}, el("th", {}, "Code"), el("th", {}, "Count"), el("th", {}, "Examples"))),
      el("tbody", {}, groups.data.map((g) =>
        el("tr", { "data-code": g.code },
          el("td", {}, el("code", {}, g.code)),
          el("td", { class: "num" }, number(g.count)),
          el("td", {}, el("ul", { class: "examples" }, g.examples.map((x) =>
            el("li", {},
              x.custom_id ? el("code", {}, x.custom_id) : null,
              x.line ? el("span", { class: "muted" }, `line ${x.line}`) : null,
              x.status_code ? el("span", { class: "muted" }, `HTTP ${x.status_code}`) : null,
              el("span", { class: "message" }, x.message || ""),
            ))))),
      )),
    ),
  ];
}

function chartView(batch, series) {
  const chart = throughputChart(series);
  if (chart) return chart;
  const start = batch.in_progress_at;
  const end = series.ended_at;
  const done = batch.request_counts.completed + batch.request_counts.failed;
  if (start && end && done) {
    const took = Math.max(1, end - start);
    return el("p", { class: "muted" },
      `Ran ${duration(took)} at ${(done / took).toFixed(1)} requests/s on average ` +
      "(the per-interval series is kept while a batch runs).");
  }
  return el("p", { class: "muted" }, done ? "No series recorded." : "Nothing finished yet.");
}

export function showBatch(root, id, ctx) {
  const head = el("div", { class: "batch-head" });
  const facts = el("dl", { class: "facts" });
  const chart = el("div", { class: "chart-box" });
  const errors = el("div", { id: "errors" });
  const files = el("div", { class: "downloads" });
  fill(root,
    el("p", {}, el("a", { href: "#/batches" }, "← Batches")),
    head,
    el("div", { class: "grid" },
      el("div", { class: "card" }, el("h2", {}, "Progress"), facts, files),
      el("div", { class: "card" }, el("h2", {}, "Throughput"), chart)),
    el("div", { class: "card" }, el("h2", {}, "Errors by code"), errors),
  );
  let lastErrors = 0;
  let errorsFinal = false;
  const refresh = async () => {
    const batch = await getBatch(id);
    const series = await throughput(id);
    if (!ctx.live()) return;
    const c = batch.request_counts;
    fill(head,
      el("h1", {}, batch.id, " ", statusBadge(batch.status)),
      el("div", { class: "actions" }, cancelButton(batch, refresh)),
    );
    const meta = Object.entries(batch.metadata || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
    fill(facts,
      field("Progress", progress(batch)),
      field("Requests", `${number(c.completed)} completed · ${number(c.failed)} failed · ${number(c.total)} total`),
      field("ETA", eta(batch)),
      field("Model", batch.model || ""),
      field("Endpoint", batch.endpoint),
      field("Usage (tokens)", usage(batch)),
      // no cost once requests finished: the model has no price
      field("Cost", cost(batch) || (c.completed ? el("span", { class: "muted" }, "no price") : "")),
      field("Created", time(batch.created_at)),
      field("Started", time(batch.in_progress_at)),
      field("Metadata", meta),
    );
    fill(files, downloads(batch));
    fill(chart, chartView(batch, series));
    // errors: every 5 s while running, once more when final
    const now = Date.now();
    if (!errorsFinal && (now - lastErrors > 5000 || TERMINAL.has(batch.status))) {
      lastErrors = now;
      const groups = await errorGroups(id);
      if (!ctx.live()) return;
      errorsFinal = TERMINAL.has(batch.status); // the error file is written before the status
      fill(errors, errorsView(groups));
    }
  };
  ctx.every(2000, refresh);
}
