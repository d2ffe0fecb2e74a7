// The Statistics page. The daemon does not publish statistics yet (issue #15),
// and this page shows no number it cannot read from the daemon.

import { h, replace } from "./dom.js";

/** Render the statistics page into `root`. */
export function statsPage(root) {
  replace(root, h("div", { class: "page stats" },
    h("h1", { text: "Statistics" }),
    h("section", { class: "card", id: "stats-not-yet" },
      h("h2", { text: "Not yet available" }),
      h("p", { text: "Requests, tokens and latency over time will appear here once the daemon publishes its "
        + "statistics (issue #15). Until then, each chat answer shows its own token count and speed, and the "
        + "Running page shows what is loaded." }))));
}
