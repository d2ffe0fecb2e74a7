// Building the page without HTML strings: every text given here becomes a text
// node, so model names, outputs and metadata can never turn into markup.

/**
 * Create an element.
 * props: `class`, `text`, `on` ({event: handler}), any other key is set as an
 * attribute (`false`/`null` skip it, `true` sets it empty).
 * children: nodes or strings (strings become text nodes); null/false are skipped.
 */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") element.className = value;
    else if (key === "text") element.textContent = value;
    else if (key === "on") for (const [event, handler] of Object.entries(value)) element.addEventListener(event, handler);
    else if (key === "value") element.value = value;
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

/** Append nodes or strings (flattening arrays) to `parent`. */
export function append(parent, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

/** Replace everything inside `parent` with `children`. */
export function replace(parent, ...children) {
  parent.replaceChildren();
  return append(parent, children);
}

/** A labelled form field: the label wraps its control so screen readers name it. */
export function field(labelText, control, hint) {
  return h("label", { class: "field" }, h("span", { class: "label" }, labelText), control,
    hint ? h("small", { class: "muted" }, hint) : null);
}

/** A table from column titles and rows of cells (nodes or strings). */
export function table(columns, rows, caption) {
  return h("table", {},
    caption ? h("caption", { class: "sr-only" }, caption) : null,
    h("thead", {}, h("tr", {}, columns.map((title) => h("th", { scope: "col" }, title)))),
    h("tbody", {}, rows));
}
