// The HTTP client: every call the UI makes goes through the public /sdapi/v1 API.

/** An API failure, with the request field it names (if any) and every per-field message. */
export class ApiError extends Error {
  constructor(status, message, field = null, errors = []) {
    super(message);
    this.status = status;
    this.field = field;
    this.errors = errors.length ? errors : [{ field, message }];
  }
}

/** FastAPI's ("body", "init_images", 0) → "init_images[0]", the name a client knows. */
export function fieldFromLoc(loc) {
  let name = "";
  for (const part of loc || []) {
    if (["body", "query", "path", "header"].includes(part)) continue;
    if (typeof part === "number") name += `[${part}]`;
    else name += (name ? "." : "") + part;
  }
  return name || null;
}

/** Turn any error body the server may send into an ApiError. */
export function toApiError(status, body, fallbackText) {
  if (body && typeof body === "object") {
    if (Array.isArray(body.detail)) {
      // FastAPI's plain schema error: {"detail": [{"loc": [...], "msg": ...}]}
      const errors = body.detail.map((e) => ({ field: fieldFromLoc(e.loc), message: e.msg ?? String(e) }));
      const first = errors[0] ?? { field: null, message: "invalid request" };
      return new ApiError(status, first.field ? `${first.field}: ${first.message}` : first.message, first.field, errors);
    }
    const detail = typeof body.detail === "string" ? body.detail : body.error || JSON.stringify(body);
    const errors = Array.isArray(body.errors)
      ? body.errors.map((e) => ({ field: e.field ?? null, message: e.message ?? detail }))
      : [];
    if (errors.length && body.field) {
      errors[0] = { field: body.field, message: detail };  // the server's sentence for the first field
    }
    return new ApiError(status, detail, body.field ?? null, errors);
  }
  const text = (fallbackText || "").trim().slice(0, 300);
  return new ApiError(status, text ? `HTTP ${status}: ${text}` : `HTTP ${status}`);
}

export async function request(method, path, body, { signal } = {}) {
  const init = { method, headers: { Accept: "application/json" }, signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `cannot reach the server (${err.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) throw toApiError(response.status, data, text);
  return data;
}

export const get = (path, options) => request("GET", path, undefined, options);
export const post = (path, body, options) => request("POST", path, body ?? {}, options);
export const del = (path, options) => request("DELETE", path, undefined, options);

/** GET that answers `fallback` when the route does not exist (e.g. no ControlNet support). */
export async function getOptional(path, fallback) {
  try {
    return await get(path);
  } catch (err) {
    if (err instanceof ApiError && (err.status === 404 || err.status === 405 || err.status === 501)) return fallback;
    throw err;
  }
}
