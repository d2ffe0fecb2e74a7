// Conversations, kept in the browser's localStorage (never sent anywhere but the model).

const KEY = "mullama.conversations";

/** The options a conversation may set, with their input limits; empty means the model's default. */
export const OPTIONS = [
  { name: "temperature", label: "Temperature", step: "0.05", min: "0", max: "5" },
  { name: "top_p", label: "Top P", step: "0.05", min: "0", max: "1" },
  { name: "top_k", label: "Top K", step: "1", min: "0" },
  { name: "num_ctx", label: "Context (num_ctx)", step: "256", min: "1" },
  { name: "num_predict", label: "Max tokens (num_predict)", step: "1", min: "-1" },
  { name: "seed", label: "Seed", step: "1" },
];

/** Every saved conversation, newest first; [] when storage is empty or unreadable. */
export function loadAll() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(list) ? list.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages)) : [];
  } catch {
    return [];
  }
}

/** Save every conversation; false when the browser refused (storage full or disabled). */
export function saveAll(list) {
  try {
    localStorage.setItem(KEY, JSON.stringify(list));
    return true;
  } catch {
    return false;
  }
}

/** A new, empty conversation with `model`. */
export function create(model) {
  const id = crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
  return { id, title: "New chat", model: model || "", system: "", options: {}, think: false, messages: [],
    updated: Date.now() };
}

/** The title a conversation takes from its first question. */
export function titleOf(conversation) {
  const first = conversation.messages.find((m) => m.role === "user");
  if (!first) return "New chat";
  const text = first.content.replace(/\s+/g, " ").trim();
  return text.length > 48 ? `${text.slice(0, 47)}…` : text || "New chat";
}

/** The /api/chat body for a conversation's history (the system prompt first, failed answers left out). */
export function chatRequest(conversation, history) {
  const messages = [];
  if (conversation.system.trim()) messages.push({ role: "system", content: conversation.system });
  for (const message of history) {
    if (message.error) continue;
    const entry = { role: message.role, content: message.content };
    if (Array.isArray(message.images) && message.images.length) entry.images = message.images;
    if (message.tool_calls?.length) entry.tool_calls = message.tool_calls;
    messages.push(entry);
  }
  const options = {};
  for (const { name } of OPTIONS) {
    const value = conversation.options[name];
    if (value !== undefined && value !== "" && Number.isFinite(Number(value))) options[name] = Number(value);
  }
  const body = { model: conversation.model, messages, stream: true, options };
  if (conversation.think) body.think = true;
  return body;
}
