// The single-page app: hash routes (#/search, #/galleries/3, #/jobs/7, #/reports?model=2),
// the API-key dialog, navigation state.

import { getKey, onKeyNeeded, setKey } from "./api.js";
import { comparePage } from "./pages/compare.js";
import { galleriesPage, galleryPage } from "./pages/galleries.js";
import { jobPage, jobsPage } from "./pages/jobs.js";
import { modelPage, modelsPage } from "./pages/models.js";
import { reportPage } from "./pages/report.js";
import { searchPage } from "./pages/search.js";
import { errorBox, h, toast } from "./ui.js";

const ROUTES = [
  [/^\/search$/, "search", searchPage],
  [/^\/galleries$/, "galleries", galleriesPage],
  [/^\/galleries\/(\d+)$/, "galleries", galleryPage],
  [/^\/models$/, "models", modelsPage],
  [/^\/models\/(\d+)$/, "models", modelPage],
  [/^\/jobs$/, "jobs", jobsPage],
  [/^\/jobs\/(\d+)$/, "jobs", jobPage],
  [/^\/reports$/, "reports", reportPage],
  [/^\/compare$/, "models", comparePage],
];

const main = document.getElementById("main");
let cleanup = null;
let firstRoute = true;

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/search";
  const [path, search = ""] = raw.split("?");
  return { path, query: new URLSearchParams(search) };
}

/** Go to a route (`navigate("/galleries/3")`); replace=true keeps history clean for filters. */
export function navigate(path, replace = false) {
  const hash = `#${path}`;
  if (replace) history.replaceState(null, "", hash);
  else location.hash = hash;
  if (replace) route();
}

async function route() {
  if (cleanup) {
    try {
      cleanup();
    } catch {
      // a page's cleanup must never block navigation
    }
    cleanup = null;
  }
  const { path, query } = parseHash();
  const match = ROUTES.find(([pattern]) => pattern.test(path));
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (match && link.dataset.nav === match[1]) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  main.replaceChildren();
  if (!match) {
    main.append(h("h1", {}, "Not found"), h("p", {}, "No page here. "), h("a", { href: "#/search" }, "Go to Search"));
    return;
  }
  const [pattern, , page] = match;
  const params = path.match(pattern).slice(1);
  const context = { query, navigate, setCleanup: (fn) => (cleanup = fn) };
  try {
    await page(main, ...params, context);
  } catch (error) {
    main.append(errorBox(error, "This page could not be loaded"));
  }
  const heading = main.querySelector("h1");
  if (heading) document.title = `${heading.textContent} · lookalike`;
  if (!firstRoute && heading) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: false });
  }
  firstRoute = false;
}

// ------------------------------------------------------------------ the API key
const dialog = document.getElementById("key-dialog");
const keyInput = document.getElementById("key-input");
const keyReason = document.getElementById("key-reason");
const keyButton = document.getElementById("key-button");

function refreshKeyButton() {
  keyButton.textContent = getKey() ? "API key ✓" : "API key";
  keyButton.setAttribute("aria-label", getKey() ? "API key (saved in this browser)" : "API key (not set)");
}

function askForKey(reason) {
  return new Promise((resolve) => {
    keyReason.textContent = reason || "";
    keyInput.value = getKey();
    dialog.returnValue = "";
    dialog.addEventListener(
      "close",
      () => {
        if (dialog.returnValue === "save" && keyInput.value.trim()) {
          setKey(keyInput.value.trim());
          toast("API key saved in this browser.");
          resolve(keyInput.value.trim());
        } else {
          if (dialog.returnValue === "clear") {
            setKey("");
            toast("API key forgotten.");
          }
          resolve(null);
        }
        refreshKeyButton();
      },
      { once: true },
    );
    dialog.showModal();
    keyInput.focus();
  });
}

keyButton.addEventListener("click", () => askForKey(""));
onKeyNeeded((detail) => askForKey(`The server answered: ${detail}`));
refreshKeyButton();

document.getElementById("skip").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

window.addEventListener("hashchange", route);
route();
