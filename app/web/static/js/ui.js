// Small DOM helpers shared by the pages.

/**
 * h("button", {class: "x", onclick: fn, type: "button"}, "text", child, [more])
 * Attributes: `class`, `text`, `html` is never used (no innerHTML of API data), `on*` handlers,
 * `dataset` (object), booleans (true sets the attribute, false/null/undefined leaves it out).
 */
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "value") element.value = value;
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

let uid = 0;
export const nextId = (prefix) => `${prefix}-${++uid}`;

/** A labelled form field: label + control (+ hint); returns [wrapper, control]. */
export function field(labelText, control, hint) {
  if (!control.id) control.id = nextId("field");
  const hintElement = hint ? h("small", { class: "hint", id: `${control.id}-hint` }, hint) : null;
  if (hintElement) control.setAttribute("aria-describedby", hintElement.id);
  return h("div", { class: "field" }, h("label", { for: control.id }, labelText), control, hintElement);
}

export function select(options, attrs = {}) {
  const element = h("select", attrs);
  for (const option of options) {
    const [value, label] = Array.isArray(option) ? option : [option, option];
    element.append(h("option", { value }, label));
  }
  return element;
}

export function toast(message, kind = "info") {
  const box = document.getElementById("toasts");
  const item = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : null }, message);
  box.append(item);
  setTimeout(() => item.remove(), kind === "error" ? 9000 : 4500);
}

export function errorBox(error, prefix) {
  const detail = error && error.message ? error.message : String(error);
  return h("p", { class: "error", role: "alert" }, prefix ? `${prefix}: ${detail}` : detail);
}

export function empty(text, ...actions) {
  return h("div", { class: "empty" }, h("p", {}, text), actions);
}

export function fmt(value, digits = 3) {
  if (value === null || value === undefined || value === "") return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  return String(value);
}

/** A metric in [0, 1] (or any float): always three decimals, so columns line up. */
export function metric(value) {
  return typeof value === "number" ? value.toFixed(3) : fmt(value);
}

export function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso.endsWith("Z") || iso.includes("+") ? iso : `${iso}Z`);
  return date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function progressBar(fraction, label) {
  const percent = Math.round(Math.max(0, Math.min(1, fraction || 0)) * 100);
  // Set through the CSSOM: the Content-Security-Policy refuses inline style attributes.
  const bar = h("div", { class: "bar" });
  bar.style.width = `${percent}%`;
  return h(
    "div",
    {
      class: "progress",
      role: "progressbar",
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": percent,
      "aria-label": label || "progress",
    },
    bar,
    h("span", { class: "pct" }, `${percent}%`),
  );
}

export function badge(state) {
  return h("span", { class: `badge state-${state}` }, state);
}

/**
 * A drop zone around a file input: click or Enter/Space (it is the input's label) to choose,
 * drag and drop, and (with `paste`) Ctrl+V of an image anywhere on the page.
 */
export function dropZone({ label, multiple = false, onFiles, paste = false, id }) {
  const input = h("input", {
    type: "file",
    accept: "image/*",
    multiple,
    id: id || nextId("files"),
    class: "visually-hidden",
  });
  const text = h("span", { class: "drop-text" }, label);
  const zone = h("label", { class: "drop", for: input.id }, h("span", { class: "drop-icon", "aria-hidden": "true" }, "⬆"), text);
  const wrapper = h("div", { class: "drop-wrap" }, input, zone);
  const deliver = (files) => {
    const list = Array.from(files || []).filter(Boolean);
    if (list.length) onFiles(multiple ? list : list.slice(0, 1));
  };
  input.addEventListener("change", () => {
    deliver(input.files);
    input.value = "";
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  zone.tabIndex = -1; // the input itself takes focus; its label shows the focus ring
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    deliver(event.dataTransfer.files);
  });
  if (paste) {
    const onPaste = (event) => {
      const files = Array.from(event.clipboardData?.files || []).filter((f) => f.type.startsWith("image/"));
      if (files.length) {
        event.preventDefault();
        deliver(files);
      }
    };
    document.addEventListener("paste", onPaste);
    wrapper.cleanup = () => document.removeEventListener("paste", onPaste);
  }
  wrapper.input = input;
  return wrapper;
}

/** A table from rows; `columns`: [{title, cell(row) -> node|string, class}]. */
export function table(columns, rows, { caption, rowAttrs } = {}) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      {},
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.class }, c.title)))),
      h(
        "tbody",
        {},
        rows.map((row) =>
          h("tr", rowAttrs ? rowAttrs(row) : {}, columns.map((c) => h("td", { class: c.class }, c.cell(row)))),
        ),
      ),
    ),
  );
}

export function definitionList(pairs) {
  return h(
    "dl",
    { class: "facts" },
    pairs.filter(Boolean).map(([term, value]) => [h("dt", {}, term), h("dd", {}, value ?? "–")]),
  );
}

export function metadataList(metadata) {
  const entries = Object.entries(metadata || {});
  if (!entries.length) return null;
  return h(
    "dl",
    { class: "metadata" },
    entries.map(([k, v]) => [h("dt", {}, k), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))]),
  );
}

/**
 * Re-render `container` with `build()` (polling pages do it every second) without losing what
 * the user was doing: open <details> stay open, and the focused control (by id or
 * data-focus-key) keeps the focus.
 */
export function rerender(container, build) {
  const active = document.activeElement;
  const key = active && container.contains(active) ? active.dataset.focusKey || active.id || null : null;
  const open = new Set([...container.querySelectorAll("details[open] > summary")].map((s) => s.textContent));
  build();
  for (const summary of container.querySelectorAll("details > summary")) {
    if (open.has(summary.textContent)) summary.parentElement.open = true;
  }
  if (key) {
    const again = container.querySelector(`[data-focus-key="${CSS.escape(key)}"]`) || document.getElementById(key);
    if (again) again.focus();
  }
}
