// Model output is untrusted: Markdown is rendered by marked, then the HTML is
// sanitised by DOMPurify before it becomes DOM. Scripts, event handlers,
// styles, images, forms and any link that is not http(s)/mailto are dropped;
// the Content-Security-Policy is a second wall behind this one.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import { h } from "./dom.js";

const marked = new Marked({ gfm: true, breaks: false, async: false });

const SANITIZE = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "iframe", "object",
    "embed", "video", "audio", "source", "picture", "link", "meta", "base"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

function copyButton(pre) {
  const button = h("button", { type: "button", class: "copy small", "aria-label": "Copy code", text: "Copy" });
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(pre.innerText);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
  });
  return button;
}

/** Markdown text as a sanitised DocumentFragment, code blocks given a copy button. */
export function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(marked.parse(text || ""), SANITIZE);
  for (const pre of fragment.querySelectorAll("pre")) {
    const wrapper = h("div", { class: "code" });
    pre.replaceWith(wrapper);
    wrapper.append(copyButton(pre), pre);
  }
  return fragment;
}
