// The web UI's entry point: a hash router over the four pages.

import { get } from "./api.js";
import { chatPage } from "./chat.js";
import { modelsPage } from "./models.js";
import { runningPage } from "./running.js";
import { statsPage } from "./stats.js";

const PAGES = { chat: chatPage, models: modelsPage, running: runningPage, stats: statsPage };
const TITLES = { chat: "Chat", models: "Models", running: "Running", stats: "Statistics" };

let leave = null;

function show() {
  const name = location.hash.replace(/^#\/?/, "").split("/")[0];
  const page = PAGES[name] ? name : "chat";
  if (typeof leave === "function") leave();
  const main = document.getElementById("main");
  leave = PAGES[page](main);
  document.title = `${TITLES[page]} · Mullama`;
  for (const link of document.querySelectorAll("nav a[data-page]")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.body.dataset.page = page;
}

async function showVersion() {
  try {
    const answer = await get("/api/version");
    document.getElementById("version").textContent = `v${answer.mullama_version || answer.version}`;
  } catch {
    // The banner already says the daemon cannot be reached.
  }
}

window.addEventListener("hashchange", show);
show();
showVersion();
