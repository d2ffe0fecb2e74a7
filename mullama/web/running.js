// The Running page: /api/ps, refreshed every few seconds; unload with keep_alive 0.

import { get, post } from "./api.js";
import { h, replace, table } from "./dom.js";
import { bytes, isForever, relative } from "./format.js";

const REFRESH_MS = 3000;

/** Render the running page into `root`; returns the function that stops its refreshing. */
export function runningPage(root) {
  const list = h("div", { id: "running-list", "aria-live": "polite" }, h("p", { class: "muted", text: "Loading…" }));
  const status = h("p", { class: "error", role: "alert" });
  replace(root, h("div", { class: "page running" },
    h("h1", { text: "Running models" }),
    h("section", { class: "card" }, status, list)));
  let timer = 0;
  let stopped = false;
  refresh();

  async function refresh() {
    clearTimeout(timer);
    try {
      const { models = [] } = (await get("/api/ps")) || {};
      replace(list, models.length ? runningTable(models)
        : h("p", { class: "muted", id: "nothing-running", text: "No model is loaded. A chat loads its model." }));
    } catch (error) {
      replace(list, h("p", { class: "error", role: "alert", text: `Could not read /api/ps: ${error.message}` }));
    }
    if (!stopped) timer = setTimeout(refresh, REFRESH_MS);
  }

  function runningTable(models) {
    const rows = models.map((model) => {
      const memory = model.memory || {};
      const breakdown = [["weights", memory.weights], ["KV cache", memory.kv_cache], ["compute", memory.compute]]
        .filter(([, value]) => value).map(([label, value]) => `${label} ${bytes(value)}`).join(", ");
      return h("tr", { "data-model": model.name },
        h("th", { scope: "row", text: model.name }),
        h("td", { class: "num", text: bytes(model.size), title: breakdown }),
        h("td", { class: "num", text: model.size_vram ? bytes(model.size_vram) : "CPU" }),
        h("td", { class: "num", text: String(model.context_length ?? "") }),
        h("td", { class: "num", text: `${model.active ?? 0} / ${model.num_parallel ?? 1}` }),
        h("td", { class: "num", text: String(model.queued ?? 0) }),
        h("td", { text: isForever(model.expires_at) ? "forever" : relative(model.expires_at), title: model.expires_at }),
        h("td", { class: "actions" }, h("button", { type: "button", class: "small danger", text: "Unload",
          "aria-label": `Unload ${model.name}`, on: { click: (event) => unload(model.name, event.target) } })));
    });
    return table(["Name", "Memory", "GPU memory", "Context", "Slots in use", "Queued", "Expires", ""], rows,
      "Loaded models");
  }

  async function unload(name, button) {
    button.disabled = true;
    button.textContent = "Unloading…";
    try {
      await post("/api/generate", { model: name, keep_alive: 0 });
      status.textContent = "";
    } catch (error) {
      status.textContent = `Could not unload ${name}: ${error.message}`;
    }
    refresh();
  }

  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
