// Shared pieces of the page: the modal dialog and the banner.

const dialog = () => document.getElementById("dialog");

/**
 * Show the modal dialog; resolves to the input's text (or true without an
 * input) on OK, null on Cancel or Escape.
 * options: title, text, label (shows an input), value, type ("password"...), ok.
 */
export function ask({ title, text = "", label = null, value = "", type = "text", ok = "OK" }) {
  const box = dialog();
  const input = document.getElementById("dialog-input");
  document.getElementById("dialog-title").textContent = title;
  document.getElementById("dialog-text").textContent = text;
  document.getElementById("dialog-label").hidden = label === null;
  document.getElementById("dialog-label-text").textContent = label || "";
  document.getElementById("dialog-ok").textContent = ok;
  input.type = type;
  input.value = value;
  return new Promise((resolve) => {
    const cancel = document.getElementById("dialog-cancel");
    const finish = (result) => {
      box.removeEventListener("close", onClose);
      cancel.removeEventListener("click", onCancel);
      resolve(result);
    };
    const onClose = () => finish(box.returnValue === "ok" ? (label === null ? true : input.value) : null);
    const onCancel = () => box.close("cancel");
    box.addEventListener("close", onClose);
    cancel.addEventListener("click", onCancel);
    box.returnValue = "";
    box.showModal();
    (label === null ? document.getElementById("dialog-ok") : input).focus();
  });
}

/** Show an error or notice across the top of the page; `null` hides it. */
export function banner(message) {
  const element = document.getElementById("banner");
  element.textContent = message || "";
  element.hidden = !message;
}
