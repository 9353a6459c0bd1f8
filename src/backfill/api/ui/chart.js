// A small inline SVG chart of requests finished per second, interval by interval.

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
