// Images for vision models: files (picked, pasted, dropped) read into Ollama's
// `images` (base64 without a data: prefix), and shown back as thumbnails.

// The formats the daemon decodes, by the first bytes of their base64; anything
// else the browser can decode (WebP, AVIF...) is turned into PNG first.
const FORMATS = [["/9j/", "image/jpeg"], ["iVBORw0KGgo", "image/png"], ["R0lGOD", "image/gif"], ["Qk", "image/bmp"]];
const BASE64 = /^[A-Za-z0-9+/]+={0,2}$/;

/** Whether a model's /api/show answer says it reads images. */
export function canSee(info) {
  return (info?.capabilities || []).includes("vision");
}

/** The image files among `files` (a FileList or array). */
export function imageFiles(files) {
  return [...(files || [])].filter((file) => file.type.startsWith("image/"));
}

/** The MIME type of base64 image data by its first bytes, or null when it is no format the daemon reads. */
export function formatOf(base64) {
  return FORMATS.find(([prefix]) => base64.startsWith(prefix))?.[1] || null;
}

/**
 * A data: URL showing base64 image data, or null when the text is not base64
 * of a known format (stored conversations are untrusted like everything else).
 */
export function dataUrl(base64) {
  if (typeof base64 !== "string" || !BASE64.test(base64)) return null;
  const type = formatOf(base64);
  return type ? `data:${type};base64,${base64}` : null;
}

/** Read one image file: { name, data } with `data` the base64 to send. Rejects with a sentence on failure. */
export async function readImage(file) {
  const url = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(new Error(`could not read ${file.name || "the image"}`));
    reader.readAsDataURL(file);
  });
  const data = url.slice(url.indexOf(",") + 1);
  if (formatOf(data)) return { name: file.name || "image", data };
  const png = await asPng(file);
  return { name: file.name || "image", data: png.slice(png.indexOf(",") + 1) };
}

async function asPng(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    throw new Error(`${file.name || "the image"} is not an image this browser can read`);
  }
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
  return canvas.toDataURL("image/png");
}
