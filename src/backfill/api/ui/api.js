// The OpenAI-compatible API, called with the key kept in this tab's sessionStorage.

const KEY = "backfill.apiKey";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const session = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY, value);
    else sessionStorage.removeItem(KEY);
  },
};

async function request(path, { method = "GET", key = session.key } = {}) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${key}` },
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    let code = null;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) {
        message = body.error.message;
        code = body.error.code;
      }
    } catch {
      // not JSON: keep the status line
    }
    throw new ApiError(response.status, message, code);
  }
  return response;
}

export async function json(path, options) {
  return (await request(path, options)).json();
}

/** Check a key by listing one batch; throws ApiError with the API's message. */
export async function checkKey(key) {
  await json("/v1/batches?limit=1", { key });
}

export const listBatches = (limit = 100) => json(`/v1/batches?limit=${limit}`);
export const getBatch = (id) => json(`/v1/batches/${encodeURIComponent(id)}`);
export const cancelBatch = (id) =>
  json(`/v1/batches/${encodeURIComponent(id)}/cancel`, { method: "POST" });
export const throughput = (id) => json(`/v1/batches/${encodeURIComponent(id)}/throughput`);
export const errorGroups = (id) => json(`/v1/batches/${encodeURIComponent(id)}/errors`);
export const modelLoads = () => json("/v1/dashboard/models");
export const getFile = (id) => json(`/v1/files/${encodeURIComponent(id)}`);

/** Most pages of one report followed through `next_page` (a 30-day range at the default
 * daily page size takes five). */
export const MAX_PAGES = 40;

/** Every bucket of an organization report (`usage/completions`, `usage/embeddings`, `costs`)
 * for `params` (name -> value or list of values), following `next_page` until the API says
 * there is no more, at most MAX_PAGES pages. Returns `{data, complete}`. */
export async function report(name, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    for (const v of Array.isArray(value) ? value : [value]) query.append(key, String(v));
  }
  const data = [];
  let page = null;
  for (let i = 0; i < MAX_PAGES; i++) {
    if (page) query.set("page", page);
    const answer = await json(`/v1/organization/${name}?${query}`);
    data.push(...answer.data);
    page = answer.has_more ? answer.next_page : null;
    if (!page) return { data, complete: true };
  }
  return { data, complete: false };
}

/** Download a file's content: fetched with the key (a plain link cannot send it), then saved. */
export async function download(fileId) {
  const [meta, response] = await Promise.all([
    getFile(fileId).catch(() => null),
    request(`/v1/files/${encodeURIComponent(fileId)}/content`),
  ]);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = (meta && meta.filename) || `${fileId}.jsonl`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
