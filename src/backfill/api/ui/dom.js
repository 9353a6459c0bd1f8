// Building DOM nodes from text only: no piece of data is ever parsed as markup.

/** An element: `el("td", {class: "num"}, "42", otherNode)`. Strings become text nodes. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else if (child instanceof Node) node.append(child);
    else node.append(document.createTextNode(String(child)));
  }
}

/** Replace everything inside `node`. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

export function time(seconds) {
  if (seconds === null || seconds === undefined) return "";
  return new Date(seconds * 1000).toLocaleString();
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds}s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m}m ${seconds % 60}s`;
  const h = Math.floor(m / 60);
  return `${h}h ${m % 60}m`;
}

export function number(n) {
  return n === null || n === undefined ? "" : Number(n).toLocaleString();
}

export function seconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

/** An amount object of the API (`{value, currency}`, currency lowercase) as text: "$0.0042". */
export function money(amount) {
  if (!amount || amount.value === null || amount.value === undefined) return "";
  const code = String(amount.currency || "").toUpperCase();
  const value = Number(amount.value);
  // up to 6 decimals (the API is exact to the micro-unit), at least 2
  try {
    return new Intl.NumberFormat(undefined, {
      style: "currency", currency: code, minimumFractionDigits: 2, maximumFractionDigits: 6,
    }).format(value);
  } catch {
    return `${value.toLocaleString(undefined, { maximumFractionDigits: 6 })} ${code}`;
  }
}
