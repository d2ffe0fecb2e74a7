// The Models page: the installed models; pull, copy, delete, create, details.

import { call, modelsWithInfo, post, stream } from "./api.js";
import { field, h, replace, table } from "./dom.js";
import { bytes, relative, seconds } from "./format.js";
import { createRequest } from "./modelfile.js";
import { ask } from "./ui.js";

const EXAMPLE_MODELFILE = `FROM smollm2:135m
PARAMETER temperature 0.7
SYSTEM """You are a concise assistant."""
`;

/** Render the models page into `root`. */
export function modelsPage(root) {
  const list = h("div", { id: "model-list", "aria-busy": "true" }, h("p", { class: "muted", text: "Loading…" }));
  const details = h("section", { id: "model-details", class: "card", hidden: true, "aria-label": "Model details" });
  replace(root, h("div", { class: "page models" },
    h("h1", { text: "Models" }),
    pullSection(() => refresh()),
    h("section", { class: "card", "aria-labelledby": "installed-title" },
      h("h2", { id: "installed-title", text: "Installed" }), list),
    details,
    createSection(() => refresh())));
  refresh();

  async function refresh() {
    list.setAttribute("aria-busy", "true");
    try {
      const models = await modelsWithInfo();
      replace(list, models.length ? modelTable(models) : h("p", { class: "muted", text: "No models yet: pull one above." }));
    } catch (error) {
      replace(list, h("p", { class: "error", role: "alert", text: `Could not list the models: ${error.message}` }));
    }
    list.setAttribute("aria-busy", "false");
  }

  function modelTable(models) {
    const rows = models.map((model) => {
      const info = model.details || {};
      const capabilities = model.info?.capabilities || [];
      return h("tr", { "data-model": model.name },
        h("th", { scope: "row", text: model.name }),
        h("td", { class: "num", text: bytes(model.size) }),
        h("td", { text: info.family || "" }),
        h("td", { text: info.parameter_size || "" }),
        h("td", { text: info.quantization_level || "" }),
        h("td", {}, capabilities.map((name) => h("span", { class: "tag", text: name }))),
        h("td", { text: relative(model.modified_at), title: model.modified_at }),
        h("td", { class: "actions" },
          h("button", { type: "button", class: "small", text: "Details", "aria-label": `Details of ${model.name}`,
            on: { click: () => showDetails(model) } }),
          h("button", { type: "button", class: "small", text: "Copy", "aria-label": `Copy ${model.name}`,
            on: { click: () => copyModel(model.name) } }),
          h("button", { type: "button", class: "small danger", text: "Delete", "aria-label": `Delete ${model.name}`,
            on: { click: () => deleteModel(model.name) } })));
    });
    return table(["Name", "Size", "Family", "Parameters", "Quantization", "Capabilities", "Modified", ""], rows,
      "Installed models");
  }

  async function copyModel(name) {
    const destination = await ask({ title: `Copy ${name}`, label: "New name", value: `${name.split(":")[0]}-copy`,
      ok: "Copy" });
    if (!destination) return;
    try {
      await post("/api/copy", { source: name, destination });
    } catch (error) {
      await ask({ title: "Copy failed", text: error.message });
    }
    refresh();
  }

  async function deleteModel(name) {
    if (!await ask({ title: "Delete model", text: `Delete ${name}? Its files are removed unless another model uses them.`,
      ok: "Delete" })) return;
    try {
      await call("DELETE", "/api/delete", { model: name });
    } catch (error) {
      await ask({ title: "Delete failed", text: error.message });
    }
    details.hidden = true;
    refresh();
  }

  function showDetails(model) {
    const info = model.info || {};
    const section = (title, text) => text ? h("div", {}, h("h3", { text: title }), h("pre", { class: "scroll", text })) : null;
    const facts = Object.entries(info.model_info || {}).map(([key, value]) => h("tr", {},
      h("th", { scope: "row", text: key }), h("td", { text: typeof value === "string" ? value : JSON.stringify(value) })));
    replace(details,
      h("div", { class: "row" }, h("h2", { text: model.name }),
        h("button", { type: "button", class: "small", text: "Close", on: { click: () => { details.hidden = true; } } })),
      model.error ? h("p", { class: "error", text: model.error }) : null,
      section("Parameters", info.parameters),
      section("System", info.system),
      section("Template", info.template),
      section("Licence", info.license),
      h("details", {}, h("summary", { text: "Modelfile" }), h("pre", { class: "scroll", text: info.modelfile || "" })),
      facts.length ? h("details", {}, h("summary", { text: "Model information" }),
        table(["Key", "Value"], facts, "Model information")) : null);
    details.hidden = false;
    details.scrollIntoView({ block: "nearest" });
  }
}

/** The pull form: a progress bar with speed and time left, cancelable. */
function pullSection(onDone) {
  const name = h("input", { id: "pull-name", required: true, placeholder: "llama3.2:1b, hf.co/owner/repo:Q4_K_M",
    autocomplete: "off" });
  const submit = h("button", { type: "submit", class: "primary", text: "Pull" });
  const cancel = h("button", { type: "button", class: "danger", text: "Cancel", hidden: true });
  const bar = h("progress", { id: "pull-progress", max: "1", value: "0", hidden: true, "aria-label": "Download progress" });
  const status = h("p", { id: "pull-status", role: "status", class: "muted" });
  let controller = null;

  cancel.addEventListener("click", () => controller?.abort());
  const form = h("form", { class: "row wrap", on: { submit: async (event) => {
    event.preventDefault();
    if (controller || !name.value.trim()) return;
    controller = new AbortController();
    submit.hidden = true;
    cancel.hidden = false;
    bar.hidden = false;
    bar.removeAttribute("value");
    const meter = new RateMeter();
    try {
      await stream("/api/pull", { model: name.value.trim(), stream: true }, (event) => {
        if (event.total) {
          bar.max = event.total;
          bar.value = event.completed || 0;
          meter.add(event.completed || 0);
          status.textContent = `${event.status}: ${progressText(event.completed || 0, event.total, meter.rate())}`;
        } else {
          status.textContent = event.status;
        }
      }, controller.signal);
      status.textContent = `Pulled ${name.value.trim()}.`;
      name.value = "";
    } catch (error) {
      status.textContent = error.name === "AbortError" ? "Pull cancelled." : `Pull failed: ${error.message}`;
    } finally {
      controller = null;
      submit.hidden = false;
      cancel.hidden = true;
      bar.hidden = true;
      onDone();
    }
  } } }, field("Model name", name), submit, cancel);
  return h("section", { class: "card", "aria-labelledby": "pull-title" },
    h("h2", { id: "pull-title", text: "Pull a model" }), form, bar, status);
}

/** Bytes per second over the last few seconds of a transfer. */
class RateMeter {
  constructor(window = 5000) {
    this.window = window;
    this.samples = [];
  }

  add(completed) {
    const now = performance.now();
    this.samples.push([now, completed]);
    while (this.samples.length > 2 && now - this.samples[0][0] > this.window) this.samples.shift();
  }

  rate() {
    const [first, last] = [this.samples[0], this.samples.at(-1)];
    const elapsed = (last?.[0] - first?.[0]) / 1000;
    return elapsed >= 0.5 ? (last[1] - first[1]) / elapsed : 0;
  }
}

function progressText(completed, total, speed) {
  const parts = [`${Math.floor((100 * completed) / total)}%`, `${bytes(completed)} / ${bytes(total)}`];
  if (speed > 0) parts.push(`${bytes(speed)}/s`, `${seconds((total - completed) / speed)} left`);
  return parts.join(" · ");
}

/** The Modelfile editor: a name and a Modelfile, sent to /api/create. */
function createSection(onDone) {
  const name = h("input", { id: "create-name", required: true, placeholder: "my-model", autocomplete: "off" });
  const text = h("textarea", { id: "modelfile", rows: "8", spellcheck: "false", value: EXAMPLE_MODELFILE });
  const submit = h("button", { type: "submit", class: "primary", text: "Create" });
  const status = h("p", { id: "create-status", role: "status", class: "muted" });
  const form = h("form", { on: { submit: async (event) => {
    event.preventDefault();
    let body;
    try {
      body = createRequest(name.value.trim(), text.value);
    } catch (error) {
      status.textContent = error.message;
      return;
    }
    submit.disabled = true;
    try {
      await stream("/api/create", body, (progress) => { status.textContent = progress.status; });
      status.textContent = `Created ${body.model}.`;
    } catch (error) {
      status.textContent = `Create failed: ${error.message}`;
    } finally {
      submit.disabled = false;
      onDone();
    }
  } } },
  field("Name", name),
  field("Modelfile", text, "FROM names an installed model or a GGUF file on the daemon's machine."),
  h("div", { class: "row" }, submit));
  return h("section", { class: "card", "aria-labelledby": "create-title" },
    h("h2", { id: "create-title", text: "Create from a Modelfile" }), form, status);
}
