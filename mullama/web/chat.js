// The Chat page: conversations, a model picker, streamed answers from /api/chat, spoken turns via /api/voice.

import { canChat, events, modelsWithInfo, stream } from "./api.js";
import * as store from "./conversations.js";
import { field, h, replace } from "./dom.js";
import { rate } from "./format.js";
import { attachmentTray } from "./attachments.js";
import { canSee, dataUrl } from "./images.js";
import { renderMarkdown } from "./markdown.js";
import { canHear, listen, pcm16, SPEECH_RATE } from "./mic.js";
import { ask } from "./ui.js";

/** The most a spoken turn's history may take in its query, URL-encoded (the daemon takes 48 KiB of it). */
const VOICE_HISTORY_CHARS = 48 * 1024;

/** Render the chat page into `root`; returns the function that leaves it. */
export function chatPage(root) {
  const state = {
    conversations: store.loadAll(),
    current: null,
    models: [],
    // The generation under way: its conversation, message and AbortController.
    running: null,
    speechModels: [],
    // While the microphone is on: the function that turns it off.
    listening: null,
    // The spoken turns, one after another.
    voiceTurns: Promise.resolve(),
  };
  const view = buildView();
  replace(root, view.element);
  loadModels();
  selectConversation(state.conversations[0] || null);
  return () => stopListening();

  function buildView() {
    const list = h("ul", { class: "conversation-list" });
    const picker = h("select", { id: "model-picker", on: { change: onModelChange } });
    const settingsButton = h("button", { type: "button", "aria-expanded": "false", "aria-controls": "chat-settings",
      text: "Settings", on: { click: toggleSettings } });
    const system = h("textarea", { id: "system-prompt", rows: "3", placeholder: "The model's own system prompt",
      on: { input: onSettingsInput } });
    const think = h("input", { type: "checkbox", id: "think", on: { change: onSettingsInput } });
    const thinkField = h("label", { class: "check", hidden: true }, think, " Think before answering");
    const optionInputs = store.OPTIONS.map((option) => h("input", {
      type: "number", name: option.name, step: option.step, min: option.min, max: option.max,
      placeholder: "default", on: { input: onSettingsInput },
    }));
    const settings = h("div", { class: "settings", id: "chat-settings", hidden: true },
      field("System prompt", system),
      h("div", { class: "grid" }, store.OPTIONS.map((option, index) => field(option.label, optionInputs[index]))),
      thinkField);
    const messages = h("ol", { class: "messages", "aria-label": "Messages" });
    const input = h("textarea", { id: "prompt", rows: "3", "aria-label": "Message",
      placeholder: "Send a message (Enter sends, Shift+Enter for a new line)",
      on: { keydown: onPromptKey, paste: (event) => tray.onPaste(event) } });
    const tray = attachmentTray({ refusal: attachRefusal, notice: (text) => { view.notice.textContent = text; },
      focus: () => input.focus() });
    const send = h("button", { type: "submit", class: "primary", id: "send", text: "Send" });
    const stop = h("button", { type: "button", id: "stop", class: "danger", text: "Stop", hidden: true,
      on: { click: stopGeneration } });
    const mic = h("button", { type: "button", id: "mic", "aria-pressed": "false", text: "Speak", hidden: true,
      on: { click: toggleMicrophone } });
    const composer = h("form", { class: "composer", on: { submit: onSubmit } }, tray.list,
      h("div", { class: "compose-row" }, input, h("div", { class: "buttons" }, tray.button, mic, send, stop)), tray.input);
    const notice = h("p", { class: "notice", role: "status" });
    const element = h("div", { class: "chat" },
      h("aside", { class: "sidebar", "aria-label": "Conversations" },
        h("button", { type: "button", class: "primary wide", id: "new-chat", text: "New chat",
          on: { click: () => selectConversation(null) } }),
        list),
      h("section", { class: "thread", "aria-label": "Conversation",
        on: tray.dropHandlers(() => element) },
        h("div", { class: "toolbar" }, field("Model", picker), settingsButton),
        settings, notice, messages, composer));
    return { element, composer, list, picker, settingsButton, settings, system, think, thinkField, optionInputs, messages,
      input, send, stop, mic, notice, tray };
  }

  // --- models -----------------------------------------------------------

  async function loadModels() {
    view.notice.textContent = "Loading models…";
    try {
      const models = await modelsWithInfo();
      state.models = models.filter(canChat);
      state.speechModels = models.filter(canHear);
      view.notice.textContent = state.models.length ? ""
        : "No model that can chat is installed yet: pull or create one on the Models page.";
    } catch (error) {
      view.notice.textContent = `Could not list the models: ${error.message}`;
    }
    renderPicker();
  }

  function renderPicker() {
    const conversation = ensureConversation();
    const names = state.models.map((model) => model.name);
    if (!names.includes(conversation.model) && names.length) conversation.model = names[0];
    const options = names.map((name) => h("option", { value: name, text: name }));
    if (conversation.model && !names.includes(conversation.model)) {
      options.unshift(h("option", { value: conversation.model, text: `${conversation.model} (not installed)` }));
    }
    replace(view.picker, options);
    view.picker.value = conversation.model;
    renderSettings();
  }

  function onModelChange() {
    const conversation = ensureConversation();
    conversation.model = view.picker.value;
    view.notice.textContent = "";
    renderSettings();
    persist();
  }

  function modelInfo(name) {
    return state.models.find((model) => model.name === name)?.info || null;
  }

  // --- conversations ------------------------------------------------------

  function ensureConversation() {
    if (!state.current) state.current = store.create(state.models[0]?.name);
    return state.current;
  }

  function selectConversation(conversation) {
    state.current = conversation || store.create(view.picker.value || state.models[0]?.name);
    renderPicker();
    renderList();
    renderMessages();
    view.input.focus();
  }

  function persist() {
    const conversation = state.current;
    if (conversation && conversation.messages.length && !state.conversations.includes(conversation)) {
      state.conversations.unshift(conversation);
    }
    if (!store.saveAll(state.conversations)) view.notice.textContent = "The browser refused to save the conversation.";
    renderList();
  }

  function renderList() {
    replace(view.list, state.conversations.map((conversation) => {
      const current = conversation === state.current;
      return h("li", { class: current ? "current" : "" },
        h("button", { type: "button", class: "link", "aria-current": current ? "true" : false, text: conversation.title,
          on: { click: () => selectConversation(conversation) } }),
        h("button", { type: "button", class: "icon", "aria-label": `Delete conversation ${conversation.title}`,
          text: "×", on: { click: () => deleteConversation(conversation) } }));
    }));
  }

  async function deleteConversation(conversation) {
    const sure = await ask({ title: "Delete conversation", text: `Delete "${conversation.title}"?`, ok: "Delete" });
    if (!sure) return;
    state.conversations = state.conversations.filter((c) => c !== conversation);
    store.saveAll(state.conversations);
    if (conversation === state.current) selectConversation(state.conversations[0] || null);
    else renderList();
  }

  // --- settings -------------------------------------------------------------

  function toggleSettings() {
    const open = view.settings.hidden;
    view.settings.hidden = !open;
    view.settingsButton.setAttribute("aria-expanded", String(open));
  }

  function renderSettings() {
    const conversation = ensureConversation();
    view.system.value = conversation.system;
    view.think.checked = Boolean(conversation.think);
    view.optionInputs.forEach((input) => { input.value = conversation.options[input.name] ?? ""; });
    const info = modelInfo(conversation.model);
    view.thinkField.hidden = !(info?.capabilities || []).includes("thinking");
    view.tray.setVisible(canSee(info));
    view.mic.hidden = !state.speechModels.length;
    view.mic.title = state.speechModels.length ? `Talk to the model (heard by ${state.speechModels[0].name})` : "";
  }

  function onSettingsInput() {
    const conversation = ensureConversation();
    conversation.system = view.system.value;
    conversation.think = view.think.checked && !view.thinkField.hidden;
    for (const input of view.optionInputs) {
      if (input.value === "") delete conversation.options[input.name];
      else conversation.options[input.name] = input.value;
    }
    persist();
  }

  // --- messages ---------------------------------------------------------------

  function renderMessages() {
    const conversation = ensureConversation();
    const items = conversation.messages.map((message, index) => messageItem(conversation, message, index));
    if (!items.length) items.push(h("li", { class: "empty muted", text: "Ask the model anything." }));
    replace(view.messages, items);
    updateButtons();
    scrollToEnd(true);
  }

  function messageItem(conversation, message, index) {
    const item = h("li", { class: `message ${message.role}`, "data-index": String(index) });
    fillMessage(item, conversation, message, index);
    return item;
  }

  function fillMessage(item, conversation, message, index) {
    const last = index === conversation.messages.length - 1;
    const busy = Boolean(state.running);
    const body = h("div", { class: "content" });
    if (message.role === "assistant") body.append(renderMarkdown(message.content));
    else body.textContent = message.content;
    const images = (Array.isArray(message.images) ? message.images : []).map(dataUrl);
    const actions = h("div", { class: "actions" });
    if (message.role === "user" && !busy) {
      actions.append(h("button", { type: "button", class: "small", text: "Edit",
        on: { click: () => editMessage(item, conversation, index) } }));
    }
    if (message.role === "assistant" && last && !busy) {
      actions.append(h("button", { type: "button", class: "small", id: "regenerate", text: "Regenerate",
        on: { click: () => regenerate(conversation) } }));
    }
    replace(item,
      h("div", { class: "role", text: message.role === "user" ? (message.spoken ? "You (spoken)" : "You")
        : conversation.model || "Assistant" }),
      message.thinking ? h("details", { class: "thinking" }, h("summary", { text: "Thinking" }),
        h("div", { class: "thinking-text", text: message.thinking })) : null,
      images.some(Boolean) ? h("div", { class: "images" }, images.map((url, number) => (url
        ? h("img", { src: url, class: "thumb", alt: `Image ${number + 1}` }) : null))) : null,
      body,
      (message.tool_calls || []).map((call) => h("div", { class: "tool-call" },
        h("span", { class: "label", text: `Tool call: ${call.function?.name ?? "?"}` }),
        h("pre", { text: JSON.stringify(call.function?.arguments ?? {}, null, 2) }))),
      message.error ? h("p", { class: "error", role: "alert", text: message.error }) : null,
      statsLine(message),
      actions);
  }

  function statsLine(message) {
    const parts = [];
    const stats = message.stats;
    if (stats) {
      if (stats.eval_count) parts.push(`${stats.eval_count} tokens`);
      const speed = rate(stats.eval_count, stats.eval_duration);
      if (speed) parts.push(`${speed.toFixed(1)} tokens/s`);
      if (stats.prompt_eval_count) parts.push(`prompt ${stats.prompt_eval_count} tokens`);
      if (stats.done_reason === "length") parts.push("stopped at the token limit");
    }
    if (message.stopped) parts.push("stopped");
    return parts.length ? h("div", { class: "stats muted", text: parts.join(" · ") }) : null;
  }

  function editMessage(item, conversation, index) {
    const message = conversation.messages[index];
    const editor = h("textarea", { rows: "4", "aria-label": "Edit message", value: message.content });
    const save = h("button", { type: "submit", class: "primary small", text: "Save and send" });
    const cancel = h("button", { type: "button", class: "small", text: "Cancel",
      on: { click: () => renderMessages() } });
    const form = h("form", { class: "edit", on: { submit: (event) => {
      event.preventDefault();
      if (!editor.value.trim()) return;
      conversation.messages.splice(index);
      sendMessage(conversation, editor.value, message.images);
    } } }, editor, h("div", { class: "buttons" }, save, cancel));
    replace(item, form);
    editor.focus();
  }

  function regenerate(conversation) {
    if (conversation.messages.at(-1)?.role === "assistant") conversation.messages.pop();
    generate(conversation);
  }

  // --- sending ----------------------------------------------------------------

  function onPromptKey(event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      view.composer.requestSubmit();
    } else if (event.key === "Escape" && state.running) {
      stopGeneration();
    }
  }

  function onSubmit(event) {
    event.preventDefault();
    const text = view.input.value;
    if (!text.trim() || state.running) return;
    if (sendMessage(ensureConversation(), text, view.tray.take())) {
      view.input.value = "";
      view.tray.clear();
    }
  }

  /** Send a question (with base64 images); false when it cannot go (no model, images for a model without sight). */
  function sendMessage(conversation, text, images = []) {
    if (!conversation.model) {
      view.notice.textContent = "Choose a model first.";
      return false;
    }
    if (images?.length && !canSee(modelInfo(conversation.model))) {
      view.notice.textContent = `${conversation.model} cannot read images: choose a model with the vision `
        + "capability, or remove the images.";
      return false;
    }
    const message = { role: "user", content: text };
    if (images?.length) message.images = images;
    conversation.messages.push(message);
    conversation.title = store.titleOf(conversation);
    generate(conversation);
    return true;
  }

  // --- images -------------------------------------------------------------------

  function attachRefusal() {
    const model = ensureConversation().model;
    return canSee(modelInfo(model)) ? null
      : `${model || "This model"} cannot read images: choose a model with the vision capability.`;
  }

  async function generate(conversation) {
    const history = conversation.messages.slice();
    const message = { role: "assistant", content: "", thinking: "", tool_calls: [] };
    conversation.messages.push(message);
    conversation.updated = Date.now();
    const controller = new AbortController();
    state.running = { conversation, message, controller };
    persist();
    renderMessages();
    const redraw = redrawer(conversation, message);
    try {
      await stream("/api/chat", store.chatRequest(conversation, history), (event) => {
        const delta = event.message || {};
        message.content += delta.content || "";
        message.thinking += delta.thinking || "";
        if (delta.tool_calls) message.tool_calls.push(...delta.tool_calls);
        if (event.done) {
          message.stats = { eval_count: event.eval_count, eval_duration: event.eval_duration,
            prompt_eval_count: event.prompt_eval_count, done_reason: event.done_reason };
        }
        redraw.soon();
      }, controller.signal);
    } catch (error) {
      if (error.name === "AbortError") message.stopped = true;
      else message.error = error.message;
    } finally {
      redraw.cancel();
      state.running = null;
      persist();
      if (state.current === conversation) renderMessages();
      updateButtons();
    }
  }

  /** Redraws `message` while it streams, at most once a frame: `soon()` asks for one, `cancel()` drops it. */
  function redrawer(conversation, message) {
    let frame = 0;
    const update = () => {
      frame = 0;
      if (state.current !== conversation) return;
      const index = conversation.messages.indexOf(message);
      const item = view.messages.querySelector(`li[data-index="${index}"]`);
      if (item) fillMessage(item, conversation, message, index);
      scrollToEnd(false);
    };
    return { soon: () => { frame ||= requestAnimationFrame(update); }, cancel: () => cancelAnimationFrame(frame) };
  }

  // --- speaking -------------------------------------------------------------------
  //
  // Each utterance the microphone hears goes to POST /api/voice as one body: the daemon transcribes it (the
  // transcript becomes the user's message) and streams the chat model's answer (the assistant's).

  async function toggleMicrophone() {
    if (state.listening) {
      stopListening(true);
      return;
    }
    view.mic.disabled = true;
    try {
      state.listening = await listen({ onStart: bargeIn, onUtterance });
      view.notice.textContent = "Listening: speak, then pause.";
    } catch (error) {
      view.notice.textContent = `The microphone is not available: ${error.message}`;
    } finally {
      view.mic.disabled = false;
      renderMicrophone();
    }
  }

  /** Turn the microphone off; `handOver`: the words being said still get their turn (not when leaving). */
  function stopListening(handOver = false) {
    const stop = state.listening;
    state.listening = null;
    if (!stop) return;
    stop(handOver);
    if (view.notice.textContent.startsWith("Listening")) view.notice.textContent = "";
    renderMicrophone();
  }

  function renderMicrophone() {
    const on = Boolean(state.listening);
    view.mic.setAttribute("aria-pressed", String(on));
    view.mic.textContent = on ? "Stop listening" : "Speak";
    view.mic.classList.toggle("listening", on);
  }

  /** Speech started: an answer streaming now is cut short, as the voice loop does (not a turn still being heard). */
  function bargeIn() {
    if (state.running && state.running.heard !== false) state.running.controller.abort();
  }

  function onUtterance(samples) {
    const conversation = ensureConversation();
    state.voiceTurns = state.voiceTurns.then(() => voiceTurn(conversation, samples));
  }

  function voiceQuery(conversation) {
    const body = store.chatRequest(conversation, conversation.messages);
    const query = new URLSearchParams({ model: conversation.model, speech_model: state.speechModels[0].name,
      rate: String(SPEECH_RATE), channels: "1", options: JSON.stringify(body.options) });
    // The conversation so far (system prompt first) rides in the query, as the body is the audio: images stay
    // behind, and the oldest turns give way until it fits the daemon's limit.
    const messages = body.messages.map(({ images, ...entry }) => entry);
    const first = messages[0]?.role === "system" ? 1 : 0;
    const size = () => new URLSearchParams({ messages: JSON.stringify(messages) }).toString().length;
    while (messages.length > first && size() > VOICE_HISTORY_CHARS) messages.splice(first, 1);
    if (messages.length) query.set("messages", JSON.stringify(messages));
    if (body.think) query.set("think", "true");
    return query;
  }

  async function voiceTurn(conversation, samples) {
    if (!conversation.model || !state.speechModels.length) {
      view.notice.textContent = "Choose a model first.";
      return;
    }
    const running = { conversation, message: null, controller: new AbortController(), heard: false };
    state.running = running;
    updateButtons();
    view.notice.textContent = "Transcribing…";
    let redraw = null;
    const onEvent = (name, data) => {
      if (name === "transcript" && data.text && !running.message) {
        conversation.messages.push({ role: "user", content: data.text, spoken: true });
        conversation.title = store.titleOf(conversation);
        running.message = { role: "assistant", content: "", thinking: "", tool_calls: [] };
        running.heard = true;
        conversation.messages.push(running.message);
        conversation.updated = Date.now();
        redraw = redrawer(conversation, running.message);
        view.notice.textContent = "";
        persist();
        renderMessages();
      } else if (name === "answer.delta" && running.message) {
        running.message.content += data.content || "";
        redraw.soon();
      } else if (name === "answer.done" && running.message) {
        running.message.content = data.text;
        running.message.stats = { done_reason: data.done_reason };
      }
    };
    try {
      await events(`/api/voice?${voiceQuery(conversation)}`, pcm16(samples), onEvent, running.controller.signal);
      if (!running.message) view.notice.textContent = "No words were heard in that.";
    } catch (error) {
      if (error.name === "AbortError") {
        if (running.message) running.message.stopped = true;
      } else if (running.message) {
        running.message.error = error.message;
      } else {
        view.notice.textContent = `Could not hear that: ${error.message}`;
      }
    } finally {
      redraw?.cancel();
      if (state.running === running) state.running = null;
      persist();
      if (state.current === conversation) renderMessages();
      updateButtons();
    }
  }

  function stopGeneration() {
    state.running?.controller.abort();
  }

  function updateButtons() {
    const busy = Boolean(state.running);
    view.stop.hidden = !busy;
    view.send.hidden = busy;
    view.element.classList.toggle("busy", busy);
  }

  function scrollToEnd(force) {
    const box = view.messages;
    if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
  }
}
