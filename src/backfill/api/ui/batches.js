// The batches page: every batch of the project, polled every 2 s.

import { cancelBatch, listBatches } from "/ui/api.js";
import { duration, el, fill, money, number, time } from "/ui/dom.js";

export const TERMINAL = new Set(["completed", "failed", "expired", "cancelled"]);

export function progress(batch) {
  const c = batch.request_counts || { total: 0, completed: 0, failed: 0 };
  const done = c.completed + c.failed;
  const pct = c.total ? (100 * done) / c.total : batch.status === "completed" ? 100 : 0;
  const bar = el("div", { class: "bar-track", role: "progressbar", "aria-valuemin": 0,
    "aria-valuemax": c.total, "aria-valuenow": done });
  // widths through CSSOM: the page's CSP allows no inline style attributes
  const doneBar = el("div", { class: "bar-done" });
  doneBar.style.width = `${pct.toFixed(1)}%`;
  bar.append(doneBar);
  const failedPct = c.total ? (100 * c.failed) / c.total : 0;
  if (failedPct) {
    const failedBar = el("div", { class: "bar-failed" });
    failedBar.style.left = `${(pct - failedPct).toFixed(1)}%`;
    failedBar.style.width = `${failedPct.toFixed(1)}%`;
    bar.append(failedBar);
  }
  return el("div", { class: "progress" }, bar,
    el("span", { class: "progress-text" }, `${number(done)} / ${number(c.total)}`));
}

export function eta(batch) {
  if (TERMINAL.has(batch.status)) return "";
  const at = batch.estimated_completion_at;
  if (!at) return "–";
  const left = at - Date.now() / 1000;
  return left <= 0 ? "any moment" : `in ${duration(left)}`;
}

export function usage(batch) {
  const u = batch.usage;
  if (!u) return "";
  return `${number(u.input_tokens)} in · ${number(u.output_tokens)} out`;
}

/** The batch's `cost` extension: billed, and what the same work costs in real time (null
 * while nothing priced was recorded: the model has no price, or nothing finished yet). */
export function cost(batch, tag = "span") {
  const c = batch.cost;
  if (!c || !c.amount) return null;
  const realtime = c.realtime_equivalent;
  return el(tag, { class: "cost" },
    el("span", { "data-cost": "amount" }, money(c.amount)),
    realtime ? el("span", { class: "muted", "data-cost": "realtime" }, ` · real time ${money(realtime)}`) : null);
}

export function statusBadge(status) {
  return el("span", { class: `status status-${status}` }, status);
}

export function cancelButton(batch, after) {
  if (TERMINAL.has(batch.status) || batch.status === "cancelling") return null;
  return el("button", {
    class: "danger small",
    type: "button",
    "data-cancel": batch.id,
    onclick: async (event) => {
      event.preventDefault();
      event.target.disabled = true;
      try {
        await cancelBatch(batch.id);
      } catch (e) {
        alert(e.message);
      }
      after();
    },
  }, "Cancel");
}

export function showBatches(root, ctx) {
  const body = el("tbody");
  const note = el("p", { class: "muted" });
  fill(root,
    el("h1", {}, "Batches"),
    el("div", { class: "card" },
      el("table", { class: "batches" },
        el("thead", {}, el("tr", {},
          ["Batch", "Status", "Progress", "ETA", "Requests", "Usage (tokens) · cost", "Created", ""]
            .map((h) => el("th", {}, h)))),
        body),
      note),
  );
  const refresh = async () => {
    const page = await listBatches();
    if (!ctx.live()) return;
    fill(body, page.data.map((b) => {
      const c = b.request_counts;
      const name = b.metadata && (b.metadata.name || b.metadata.description);
      return el("tr", { "data-batch": b.id },
        el("td", {}, el("a", { href: `#/batch/${encodeURIComponent(b.id)}` }, b.id),
          name ? el("div", { class: "muted small" }, name) : null),
        el("td", {}, statusBadge(b.status)),
        el("td", {}, progress(b)),
        el("td", { class: "small nowrap", title: b.estimated_completion_at ? time(b.estimated_completion_at) : null }, eta(b)),
        el("td", { class: "small nowrap" }, `${number(c.completed)} ok · ${number(c.failed)} failed`,
          el("div", { class: "muted" }, `of ${number(c.total)}`)),
        el("td", { class: "small nowrap" }, usage(b), cost(b, "div")),
        el("td", { class: "small" }, time(b.created_at)),
        el("td", {}, cancelButton(b, refresh)),
      );
    }));
    note.textContent = page.data.length ? (page.has_more ? "Showing the newest 100." : "") : "No batches yet.";
  };
  ctx.every(2000, refresh);
}
