// The public REST API (/api/v1), with the API key kept in localStorage for writes.

export const API = "/api/v1";
const KEY_STORAGE = "lookalike.apiKey";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail || `request failed (HTTP ${status})`);
    this.status = status;
    this.detail = detail;
  }
}

export function getKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function setKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

let askForKey = null;

/** `prompt(reason) -> Promise<string|null>`: asks the user for a key (the app's dialog). */
export function onKeyNeeded(prompt) {
  askForKey = prompt;
}

/** The API's `detail` (or the body's text) of a failed response, as one sentence. */
export async function detailOf(response) {
  const text = await response.text().catch(() => "");
  return detailText(text, response.status, response.statusText);
}

function detailText(text, status, statusText) {
  try {
    const body = JSON.parse(text);
    const detail = body.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    }
  } catch {
    // not JSON
  }
  return text.trim() || `${status} ${statusText}`;
}

function urlOf(path, query) {
  const url = new URL(path.startsWith("/") && !path.startsWith(API) ? API + path : path, location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value === undefined || value === null || value === "") continue;
    for (const one of Array.isArray(value) ? value : [value]) url.searchParams.append(name, one);
  }
  return url.pathname + url.search;
}

/**
 * fetch() against the API. Options: method, query (object; arrays repeat), json (a body sent as
 * JSON), form (FormData), raw (return the Response, whatever its status). A 401/403 asks for
 * the API key once and retries; other failures throw ApiError carrying the API's detail.
 */
export async function request(path, options = {}) {
  const { method = "GET", query, json, form, raw = false, retried = false } = options;
  const headers = {};
  const key = getKey();
  if (key) headers["X-API-Key"] = key;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  let response;
  try {
    response = await fetch(urlOf(path, query), { method, headers, body });
  } catch (error) {
    throw new ApiError(0, `the server cannot be reached (${error.message})`);
  }
  if ((response.status === 401 || response.status === 403) && askForKey && !retried) {
    const detail = await detailOf(response);
    const entered = await askForKey(detail);
    if (entered) return request(path, { ...options, retried: true });
    throw new ApiError(response.status, detail);
  }
  if (raw) return response;
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

/**
 * POST a FormData with upload progress (fetch reports none): `onProgress(sentBytes, total)`.
 * Resolves to the parsed JSON answer; rejects with ApiError carrying the API's detail. A
 * 401/403 asks for the API key once and sends again.
 */
export function uploadWithProgress(path, form, onProgress, retried = false) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", urlOf(path));
    const key = getKey();
    if (key) xhr.setRequestHeader("X-API-Key", key);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded, event.total);
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "the server cannot be reached")));
    xhr.addEventListener("load", async () => {
      const detail = detailText(xhr.responseText, xhr.status, xhr.statusText);
      if ((xhr.status === 401 || xhr.status === 403) && askForKey && !retried) {
        const entered = await askForKey(detail);
        if (entered) {
          uploadWithProgress(path, form, onProgress, true).then(resolve, reject);
          return;
        }
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else reject(new ApiError(xhr.status, detail));
    });
    xhr.send(form);
  });
}

export const get = (path, query) => request(path, { query });
export const post = (path, json) => request(path, { method: "POST", json });

/** Set an <img>'s source; when reads need the key, load it with the key as a blob instead. */
export function loadImage(img, url) {
  img.addEventListener(
    "error",
    async () => {
      if (!getKey() || img.dataset.retried) return;
      img.dataset.retried = "1";
      const response = await fetch(url, { headers: { "X-API-Key": getKey() } }).catch(() => null);
      if (response && response.ok) img.src = URL.createObjectURL(await response.blob());
    },
    { once: true },
  );
  img.src = url;
  return img;
}

/**
 * Show a PNG the API renders (a plot) in `img`, fetched with the key; `status` (a "Rendering…"
 * line) is removed once it shows, or replaced by the API's reason. Sets `marker.dataset.loaded`
 * to "true" or "error" (the tests wait on it).
 */
export function showPng(url, img, status, marker, errorBox) {
  const headers = getKey() ? { "X-API-Key": getKey() } : {};
  fetch(url, { headers })
    .then(async (response) => {
      if (!response.ok) throw new Error(await detailOf(response));
      img.src = URL.createObjectURL(await response.blob());
      await img.decode();
      img.hidden = false;
      status.remove();
      marker.dataset.loaded = "true";
    })
    .catch((error) => {
      status.replaceWith(errorBox(error, "This plot could not be made"));
      marker.dataset.loaded = "error";
    });
}

export const thumbnailUrl = (imageId) => `${API}/images/${imageId}/thumbnail`;
