// Small inline SVG charts: requests finished per second of a batch, interval by interval, and
// usage per bucket (stacked bars). Text goes in through textContent only.

const SVG = "http://www.w3.org/2000/svg";
const W = 640;
const H = 180;
const PAD = { left: 44, right: 12, top: 12, bottom: 26 };

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/** `series`: the throughput endpoint's answer. Returns an <svg>, or null with no points. */
export function throughputChart(series) {
  const points = series.points;
  if (!points.length) return null;
  const step = series.interval;
  const rates = points.map((p) => (p.completed + p.failed) / step);
  const failed = points.map((p) => p.failed / step);
  const top = Math.max(...rates, 0.001) * 1.1;
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const barW = plotW / points.length;
  const y = (v) => PAD.top + plotH - (v / top) * plotH;

  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: "chart",
    role: "img",
    "aria-label": "requests finished per second",
  });
  root.append(svg("title", {}, "Requests finished per second"));
  for (const frac of [0, 0.5, 1]) {
    const v = top * frac;
    root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: PAD.left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" },
      v >= 10 ? v.toFixed(0) : v.toFixed(1)));
  }
  points.forEach((p, i) => {
    const x = PAD.left + i * barW + Math.min(1, barW * 0.1);
    const w = Math.max(1, barW - 2 * Math.min(1, barW * 0.1));
    const ok = rates[i] - failed[i];
    const bar = svg("rect", { x, y: y(rates[i]), width: w, height: y(0) - y(rates[i]), class: "bar" });
    bar.append(svg("title", {}, `${clock(p.start)}: ${p.completed} completed, ${p.failed} failed`));
    root.append(bar);
    if (p.failed) {
      root.append(svg("rect", { x, y: y(rates[i]), width: w, height: y(ok) - y(rates[i]), class: "bar failed" }));
    }
  });
  root.append(svg("text", { x: PAD.left, y: H - 6, class: "axis" }, clock(points[0].start)));
  root.append(svg("text", { x: W - PAD.right, y: H - 6, class: "axis", "text-anchor": "end" },
    clock(points[points.length - 1].start + step)));
  root.append(svg("text", { x: (PAD.left + W - PAD.right) / 2, y: H - 6, class: "axis", "text-anchor": "middle" },
    `requests/s, ${step}s intervals`));
  return root;
}

function compact(v) {
  if (v >= 1e9) return `${+(v / 1e9).toFixed(1)}G`;
  if (v >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
  if (v >= 1e4) return `${+(v / 1e3).toFixed(0)}k`;
  if (v >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
  return v >= 10 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1);
}

/** Stacked bars, one a bucket. `bars`: [{label, title, parts: [value, ...]}], the parts drawn
 * bottom up with the classes `classes` (`bar part-<class>`); `name` labels the chart. Every
 * bar is drawn, empty ones as a baseline tick, so the range reads as time. */
export function barChart(bars, { name, classes, height = 150 }) {
  const h = height;
  const totals = bars.map((b) => b.parts.reduce((a, v) => a + v, 0));
  const peak = Math.max(...totals, 0);
  // a round top just above the peak: 1, 1.5, 2, 3, 4, 5, 6, 8 or 10 times a power of ten
  const nice = (v) => {
    const p = 10 ** Math.floor(Math.log10(v));
    return [1, 1.5, 2, 3, 4, 5, 6, 8, 10].map((m) => m * p).find((x) => x >= v);
  };
  const top = peak > 0 ? nice(peak) : 1;
  const plotW = W - PAD.left - PAD.right;
  const plotH = h - PAD.top - PAD.bottom;
  const barW = plotW / Math.max(1, bars.length);
  const y = (v) => PAD.top + plotH - (v / top) * plotH;

  const root = svg("svg", { viewBox: `0 0 ${W} ${h}`, class: "chart", role: "img", "aria-label": name });
  root.append(svg("title", {}, name));
  for (const frac of [0, 0.5, 1]) {
    const v = top * frac;
    root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: PAD.left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" }, compact(v)));
  }
  const gap = Math.min(3, barW * 0.15);
  bars.forEach((b, i) => {
    const x = PAD.left + i * barW + gap;
    const w = Math.max(1, barW - 2 * gap);
    const group = svg("g", { class: "bucket", "data-bucket": i });
    group.append(svg("title", {}, b.title));
    // a transparent full-height target so the bucket's title shows on hover even when empty
    group.append(svg("rect", { x, y: PAD.top, width: w, height: plotH, class: "hit" }));
    let base = 0;
    b.parts.forEach((v, k) => {
      if (v <= 0) return;
      group.append(svg("rect", { x, y: y(base + v), width: w, height: y(base) - y(base + v), class: `bar part-${classes[k]}` }));
      base += v;
    });
    root.append(group);
  });
  // labels under the first, middle and last bucket (all of them when few)
  const every = bars.length <= 8 ? 1 : Math.ceil(bars.length / 6);
  bars.forEach((b, i) => {
    if (i % every !== 0 && i !== bars.length - 1) return;
    if (i !== bars.length - 1 && bars.length - 1 - i < every / 2) return; // keep clear of the last
    root.append(svg("text", { x: PAD.left + (i + 0.5) * barW, y: h - 8, class: "axis", "text-anchor": "middle" }, b.label));
  });
  return root;
}
