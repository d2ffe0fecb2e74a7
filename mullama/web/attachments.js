// The chat composer's tray of images waiting to go with the next message:
// thumbnails with a remove button each, an "Add image" button over a file
// input, and the handlers that take images from a paste or a drop.

import { h, replace } from "./dom.js";
import { dataUrl, imageFiles, readImage } from "./images.js";

/**
 * A tray. options:
 *   refusal()     null when images may be added now, else the sentence saying why not
 *   notice(text)  show a sentence to the user
 *   focus()       where the focus goes after a thumbnail is removed
 * Returns { list, button, input, take(), clear(), setVisible(on), onPaste, dropHandlers(area) }.
 */
export function attachmentTray({ refusal, notice, focus }) {
  const items = [];
  const list = h("ul", { class: "attachments", id: "attachments", "aria-label": "Images to send", hidden: true });
  const input = h("input", { type: "file", id: "attach-input", accept: "image/*", multiple: true, hidden: true,
    on: { change: () => { add(input.files); input.value = ""; } } });
  const button = h("button", { type: "button", id: "attach", text: "Add image", hidden: true,
    "aria-label": "Attach images", title: "Attach images (or paste or drop them here)", on: { click: () => input.click() } });

  async function add(files) {
    const images = imageFiles(files);
    if (!images.length) return;
    const why = refusal();
    if (why) {
      notice(why);
      return;
    }
    for (const file of images) {
      try {
        items.push(await readImage(file));
      } catch (error) {
        notice(`Not attached: ${error.message}.`);
      }
    }
    render();
  }

  function render() {
    replace(list, items.map((image, index) => h("li", {},
      h("img", { src: dataUrl(image.data), alt: image.name, class: "thumb" }),
      h("button", { type: "button", class: "icon", text: "×", "aria-label": `Remove image ${image.name}`,
        on: { click: () => {
          items.splice(index, 1);
          render();
          focus();
        } } }))));
    list.hidden = !items.length;
  }

  function carriesFiles(event) {
    return [...(event.dataTransfer?.types || [])].includes("Files");
  }

  return {
    list, input, button,
    /** The images' base64, in the order they were added. */
    take: () => items.map((image) => image.data),
    /** Empty the tray (the images went). */
    clear() {
      items.length = 0;
      render();
    },
    /** Show or hide the Add image button (whether the chosen model reads images). */
    setVisible(on) {
      button.hidden = !on;
    },
    /** For the message box: a pasted image joins the tray; pasted text still goes into the box. */
    onPaste(event) {
      const images = imageFiles(event.clipboardData?.files);
      if (!images.length) return;
      if (!event.clipboardData.getData("text/plain")) event.preventDefault();
      add(images);
    },
    /** Event handlers that let `area` take dropped images, marking it `dropping` while files hover over it. */
    dropHandlers(area) {
      return {
        dragover(event) {
          if (!carriesFiles(event)) return;
          event.preventDefault();
          event.dataTransfer.dropEffect = "copy";
          area().classList.add("dropping");
        },
        dragleave(event) {
          if (!event.currentTarget.contains(event.relatedTarget)) area().classList.remove("dropping");
        },
        drop(event) {
          area().classList.remove("dropping");
          if (!carriesFiles(event)) return;
          event.preventDefault();
          add(event.dataTransfer.files);
        },
      };
    },
  };
}
