// The daemon's public API, from the page: JSON calls, NDJSON and server-sent event streams, the API key.
//
// The key, when the daemon wants one, is asked for once and kept in
// sessionStorage only: it is gone when the tab closes.

import { ask, banner } from "./ui.js";

const KEY_STORAGE = "mullama.apiKey";

/** An error answer from the daemon (status 0: no answer at all). */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const JSON_TYPE = "application/json";

function headers(type, key) {
  const result = {};
  if (type) result["Content-Type"] = type;
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

// The question under way: requests refused at the same moment share one dialog.
let asking = null;

/** Ask for the key once for every request waiting on it; resolves to the key, or null when the user cancels. */
function askForKey(refused) {
  asking ||= ask({
    title: "API key required",
    text: refused ? "The daemon refused that key. Enter another; it is kept for this browser session only."
      : "This daemon requires an API key. It is kept for this browser session only.",
    label: "API key", type: "password", ok: "Use key",
  }).then((key) => {
    if (key !== null) sessionStorage.setItem(KEY_STORAGE, key);
    return key;
  }).finally(() => { asking = null; });
  return asking;
}

async function errorOf(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    return new ApiError(response.status, typeof error === "string" ? error : error?.message || text);
  } catch {
    return new ApiError(response.status, text || `${response.status} ${response.statusText}`);
  }
}

/**
 * Send one request; on 401 ask for the API key and try again. Returns the Response.
 * The body is JSON, or bytes sent as they are when `type` names another type.
 */
async function send(method, path, body, signal, type = JSON_TYPE) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    let response;
    try {
      response = await fetch(path, {
        method, signal, headers: headers(body === undefined ? null : type, key),
        body: body === undefined || type !== JSON_TYPE ? body : JSON.stringify(body),
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      banner(`Cannot reach the Mullama daemon at ${location.origin}. Is it running?`);
      throw new ApiError(0, "cannot reach the daemon");
    }
    banner(null);
    if (response.status !== 401) {
      if (!response.ok) throw await errorOf(response);
      return response;
    }
    // Another request may have been given a key while this one was refused: try that first.
    if (sessionStorage.getItem(KEY_STORAGE) !== key) continue;
    if (await askForKey(Boolean(key)) === null) throw await errorOf(response);
  }
}

/** A JSON call; resolves to the parsed answer (null when empty). */
export async function call(method, path, body, signal) {
  const response = await send(method, path, body, signal);
  const text = await response.text();
  return text.trim() ? JSON.parse(text) : null;
}

export const get = (path) => call("GET", path);
export const post = (path, body, signal) => call("POST", path, body, signal);

/**
 * POST and call `onEvent` with each object of the NDJSON answer as it arrives.
 * A line carrying `error` (how Ollama reports failures mid-stream) throws.
 * Aborting `signal` ends the stream (and the daemon's work on it).
 */
export async function stream(path, body, onEvent, signal) {
  const response = await send("POST", path, body, signal);
  await read(response, "\n", (line) => {
    if (!line.trim()) return;
    const event = JSON.parse(line);
    if (event.error) throw new ApiError(response.status, event.error);
    onEvent(event);
  });
}

/**
 * POST `bytes` (application/octet-stream) and call `onEvent(name, data)` with each server-sent event of the
 * answer as it arrives. An `error` event throws. Aborting `signal` ends the stream.
 */
export async function events(path, bytes, onEvent, signal) {
  const response = await send("POST", path, bytes, signal, "application/octet-stream");
  await read(response, "\n\n", (block) => {
    if (!block.trim()) return;
    const fields = {};
    for (const line of block.split("\n")) {
      const colon = line.indexOf(":");
      if (colon > 0) fields[line.slice(0, colon)] = line.slice(colon + 1).trimStart();
    }
    const data = fields.data ? JSON.parse(fields.data) : {};
    if (fields.event === "error") throw new ApiError(response.status, data.error || "the stream failed");
    onEvent(fields.event || "message", data);
  });
}

/** Call `handle` with each piece of a streamed answer's text, cut at `separator`, as the pieces arrive. */
async function read(response, separator, handle) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += decoder.decode(value, { stream: true });
    const pieces = pending.split(separator);
    pending = pieces.pop();
    pieces.forEach(handle);
  }
  handle(pending + decoder.decode());
}

/** Every model with its /api/show answer (capabilities, details...), in /api/tags order. */
export async function modelsWithInfo() {
  const { models = [] } = (await get("/api/tags")) || {};
  return Promise.all(models.map(async (model) => {
    try {
      return { ...model, info: await post("/api/show", { model: model.name }) };
    } catch (error) {
      return { ...model, info: null, error: error.message };
    }
  }));
}

/** Whether a model (from modelsWithInfo) can chat. */
export function canChat(model) {
  return (model.info?.capabilities || []).includes("completion");
}
