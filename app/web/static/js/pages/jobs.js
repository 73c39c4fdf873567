// Jobs: the list with live progress (polling), forms to start training and evaluation (and to
// register a dataset), a job's page with its metrics, result, log tail and cancel.

import { get, post, request } from "../api.js";
import { badge, definitionList, empty, errorBox, field, fmt, h, metric, progressBar, rerender, select, table, toast, when } from "../ui.js";

// "" (the default) lets the server choose the best method measured for the dataset's kind of
// data (DVML+margin: preset dvml-icons, dvml-cjk or dvml; docs/results.md).
const METHODS = [["", "recommended for the dataset"], "margin", "triplet", "contrastive", "npair", "diva", "dvml", "magnet"];
const ACTIVE = new Set(["queued", "running"]);
const POLL_ACTIVE_MS = 1000;
const POLL_IDLE_MS = 5000;

function detailOfJob(job) {
  if (job.type === "train" && job.total_steps) return `epoch ${fmt(job.epoch)}, step ${fmt(job.step)}/${fmt(job.total_steps)}`;
  if (job.total_steps) return `${fmt(job.step)}/${fmt(job.total_steps)}`;
  if (job.step) return `step ${job.step}`;
  return "";
}

function paramsSummary(job) {
  const p = job.params || {};
  if (job.type === "train") {
    const method = p.method || job.result?.method || (p.preset ? "the preset's method" : "the recommended method");
    const preset = p.preset || job.result?.preset;
    return `${method} on dataset ${p.dataset_id}${preset ? `, preset ${preset}` : ""}`;
  }
  if (job.type === "evaluate") return `model ${p.model_id} on dataset ${p.dataset_id} (${p.split || "test"})`;
  if (job.type === "index") return `gallery ${p.gallery_id} → model ${p.model_id}`;
  if (job.type === "import") return `gallery ${p.gallery_id}${p.folder ? ` from ${p.folder}` : " from an archive"}`;
  if (job.type === "dataset") return `dataset ${p.dataset_id}`;
  if (job.type === "cluster") return `gallery ${p.gallery_id}, ${p.method || "kmeans"}, k ${p.k || `by silhouette up to ${p.k_max || 50}`}`;
  return "";
}

/** Poll `tick` every second while it reports active work, every 5 s otherwise; stoppable. */
function poller(tick) {
  let timer = null;
  let stopped = false;
  const loop = async () => {
    let active = false;
    try {
      active = await tick();
    } catch {
      active = false;
    }
    if (!stopped) timer = setTimeout(loop, active ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  };
  loop();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

/**
 * A live line for one job (state, progress, link to its page) in `container`, polled every
 * second until it ends; then `onEnd(job)`. Returns the stop function (for a page's cleanup).
 */
export function followJob(jobId, container, onEnd) {
  let ended = false;
  return poller(async () => {
    if (ended) return false;
    const job = await get(`/jobs/${jobId}`);
    container.replaceChildren(
      h(
        "div",
        { class: "line job-line", dataset: { jobId, state: job.state } },
        h("a", { href: `#/jobs/${job.id}` }, `${job.type} job ${job.id}`),
        badge(job.state),
        progressBar(job.progress, `job ${job.id} progress`),
        h("span", { class: "hint" }, job.error || detailOfJob(job)),
      ),
    );
    if (TERMINAL.has(job.state)) {
      ended = true;
      if (onEnd) onEnd(job);
      return false;
    }
    return true;
  });
}

async function cancelJob(job, after) {
  try {
    await request(`/jobs/${job.id}/cancel`, { method: "POST" });
    toast(`Cancel requested for job ${job.id}.`);
  } catch (error) {
    toast(`Not cancelled: ${error.message}`, "error");
  }
  if (after) after();
}

export async function jobsPage(main, { query, navigate, setCleanup }) {
  main.append(h("h1", {}, "Jobs"));
  const typeFilter = select([["", "all types"], "train", "evaluate", "index", "import", "dataset"], { id: "jobs-type" });
  const stateFilter = select([["", "all states"], "queued", "running", "succeeded", "failed", "cancelled"], { id: "jobs-state" });
  const list = h("div", { id: "jobs-list", "aria-live": "off" });
  main.append(
    h("section", { "aria-labelledby": "jobs-title" }, h("h2", { id: "jobs-title", class: "visually-hidden" }, "All jobs"), h("form", { class: "row inline" }, field("Type", typeFilter), field("State", stateFilter)), list),
  );
  const refresh = async () => {
    const page = await get("/jobs", { type: typeFilter.value || undefined, state: stateFilter.value || undefined, limit: 50 });
    renderList(page);
    return page.items.some((job) => ACTIVE.has(job.state));
  };
  typeFilter.addEventListener("change", refresh);
  stateFilter.addEventListener("change", refresh);
  setCleanup(poller(refresh));

  function renderList(page) {
    rerender(list, () => fillList(page));
  }

  function fillList(page) {
    if (!page.items.length) {
      list.replaceChildren(empty(typeFilter.value || stateFilter.value ? "No job matches these filters." : "No job yet. Start a training or an evaluation below."));
      return;
    }
    list.replaceChildren(
      table(
        [
          { title: "Job", cell: (j) => h("a", { href: `#/jobs/${j.id}`, dataset: { focusKey: `job-${j.id}` } }, `#${j.id}`) },
          { title: "Type", cell: (j) => j.type },
          { title: "What", cell: (j) => paramsSummary(j) },
          { title: "State", cell: (j) => badge(j.state) },
          { title: "Progress", cell: (j) => [progressBar(j.progress, `job ${j.id} progress`), h("small", { class: "hint" }, detailOfJob(j))], class: "progress-cell" },
          { title: "Created", cell: (j) => when(j.created_at) },
          { title: "", cell: (j) => (ACTIVE.has(j.state) && !j.cancel_requested ? h("button", { type: "button", class: "secondary small", dataset: { focusKey: `cancel-${j.id}` }, "aria-label": `Cancel job ${j.id}`, onclick: () => cancelJob(j, refresh) }, "Cancel") : j.cancel_requested && ACTIVE.has(j.state) ? h("small", { class: "hint" }, "cancelling…") : "") },
        ],
        page.items,
        { caption: `${page.total} jobs, newest first`, rowAttrs: (j) => ({ dataset: { jobId: j.id, state: j.state } }) },
      ),
    );
  }

  // ---------------------------------------------------------------- forms
  const [datasets, models, presetList] = await Promise.all([get("/datasets").catch(() => []), get("/models").catch(() => []), get("/presets").catch(() => [])]);
  const ready = datasets.filter((d) => d.status === "ready");
  const datasetOptions = ready.map((d) => [String(d.id), `${d.name} (${d.kind}${d.splits?.train ? `, ${d.splits.train.classes} train classes` : ""})`]);
  const forms = h("div", { class: "forms" });
  main.append(forms);

  // Train
  const trainMessage = h("div", { "aria-live": "polite" });
  if (ready.length) {
    const dataset = select(datasetOptions, { id: "train-dataset" });
    const method = select(METHODS, { id: "train-method" });
    const preset = h("input", { id: "train-preset", type: "text", list: "presets", placeholder: "recommended", autocomplete: "off" });
    // The server's list (GET /presets), recommended ones first, each labelled with its method.
    const presets = h("datalist", { id: "presets" }, presetList.map((p) => h("option", { value: p.name, label: `${p.method}${p.recommended ? " (recommended)" : ""}` })));
    const budgetKind = select([["iterations", "iterations"], ["epochs", "epochs"], ["time_budget_min", "minutes"]], { id: "train-budget-kind" });
    const budget = h("input", { id: "train-budget", type: "number", min: 1, step: "any", placeholder: "preset's default" });
    const name = h("input", { id: "train-name", type: "text", maxlength: 200, placeholder: "<method>-job<id>", autocomplete: "off" });
    const extra = h("textarea", { id: "train-hyperparameters", rows: 3, spellcheck: "false", placeholder: '{"lr": 2e-5, "batch_size": 64}' });
    const form = h(
      "form",
      { class: "panel", id: "train-form" },
      h("h2", {}, "Train a model"),
      h("div", { class: "row" }, field("Dataset", dataset), field("Method", method), field("Preset", preset, "dvml-icons, cub200, … or empty")),
      presets,
      h("div", { class: "row" }, field("Budget", budget), field("Budget unit", budgetKind), field("Model name", name)),
      field("More hyperparameters (JSON)", extra, "Any training option, e.g. lr, batch_size, image_size, eval_train."),
      h("div", { class: "actions" }, h("button", { type: "submit" }, "Start training")),
      trainMessage,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      trainMessage.replaceChildren();
      let hyperparameters = {};
      if (extra.value.trim()) {
        try {
          hyperparameters = JSON.parse(extra.value);
          if (typeof hyperparameters !== "object" || Array.isArray(hyperparameters) || hyperparameters === null) throw new Error("not an object");
        } catch (error) {
          trainMessage.replaceChildren(errorBox(`The hyperparameters must be a JSON object (${error.message}).`));
          return;
        }
      }
      if (budget.value) hyperparameters[budgetKind.value] = Number(budget.value);
      const params = { dataset_id: parseInt(dataset.value, 10), hyperparameters };
      if (method.value) params.method = method.value;
      if (preset.value.trim()) params.preset = preset.value.trim();
      if (name.value.trim()) params.model_name = name.value.trim();
      try {
        const job = await post("/jobs", { type: "train", params });
        toast(`Training job ${job.id} queued.`);
        trainMessage.replaceChildren(h("p", {}, "Started ", h("a", { href: `#/jobs/${job.id}` }, `job ${job.id}`), "."));
        refresh();
      } catch (error) {
        trainMessage.replaceChildren(errorBox(error, "Not started"));
      }
    });
    forms.append(form);
  } else {
    forms.append(h("section", { class: "panel" }, h("h2", {}, "Train a model"), empty("Training and evaluation need a ready dataset: register one below.")));
  }

  // Evaluate
  if (ready.length && models.length) {
    const model = select(models.map((m) => [String(m.id), m.name]), { id: "evaluate-model" });
    if (query.get("evaluate")) model.value = query.get("evaluate");
    const dataset = select(datasetOptions, { id: "evaluate-dataset" });
    const split = select(["test", "train"], { id: "evaluate-split" });
    const maxClasses = h("input", { id: "evaluate-max-classes", type: "number", min: 2, placeholder: "all" });
    const message = h("div", { "aria-live": "polite" });
    const form = h(
      "form",
      { class: "panel", id: "evaluate-form" },
      h("h2", {}, "Evaluate a model"),
      h("div", { class: "row" }, field("Model", model), field("Dataset", dataset)),
      h("div", { class: "row" }, field("Split", split, "train: the memorisation check"), field("Classes", maxClasses, "The first N classes only.")),
      h("div", { class: "actions" }, h("button", { type: "submit" }, "Start evaluation")),
      message,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      message.replaceChildren();
      const params = { model_id: parseInt(model.value, 10), dataset_id: parseInt(dataset.value, 10), split: split.value };
      if (maxClasses.value) params.max_classes = parseInt(maxClasses.value, 10);
      try {
        const job = await post("/jobs", { type: "evaluate", params });
        toast(`Evaluation job ${job.id} queued.`);
        message.replaceChildren(h("p", {}, "Started ", h("a", { href: `#/jobs/${job.id}` }, `job ${job.id}`), "."));
        refresh();
      } catch (error) {
        message.replaceChildren(errorBox(error, "Not started"));
      }
    });
    forms.append(form);
  }

  // Register a dataset
  const dsName = h("input", { id: "dataset-name", type: "text", required: true, maxlength: 200, autocomplete: "off" });
  const dsKind = select(["imagefolder", "cub200", "cars196", "sop", "icons", "cjk"], { id: "dataset-kind" });
  const dsPath = h("input", { id: "dataset-path", type: "text", placeholder: "a folder under the server's dataset root", autocomplete: "off" });
  const dsMessage = h("div", { "aria-live": "polite" });
  const dsForm = h(
    "form",
    { class: "panel", id: "dataset-form" },
    h("h2", {}, "Register a dataset"),
    h("p", { class: "hint" }, `${datasets.length} registered${datasets.length ? `: ${datasets.map((d) => `${d.name} (${d.status})`).join(", ")}` : ""}.`),
    h("div", { class: "row" }, field("Name", dsName), field("Kind", dsKind), field("Path", dsPath, "Not for icons and cjk: a worker builds those.")),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "secondary" }, "Register dataset")),
    dsMessage,
  );
  dsForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    dsMessage.replaceChildren();
    const body = { name: dsName.value.trim(), kind: dsKind.value };
    if (dsPath.value.trim()) body.path = dsPath.value.trim();
    try {
      const created = await post("/datasets", body);
      toast(`Dataset “${created.name}” is ${created.status}.`);
      navigate("/jobs", true);
    } catch (error) {
      dsMessage.replaceChildren(errorBox(error, "Not registered"));
    }
  });
  forms.append(dsForm);
}

export async function jobPage(main, jobId, { setCleanup }) {
  main.append(h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "Jobs"), " / "));
  const heading = h("h1", {}, `Job ${jobId}`);
  const body = h("div", { id: "job-body" });
  const logBox = h("pre", { class: "log", id: "job-log", tabindex: 0, "aria-label": "Log tail" });
  main.append(heading, body, h("h2", {}, "Log (last 200 lines)"), logBox);
  let lastState = null;

  const refresh = async () => {
    const job = await get(`/jobs/${jobId}`);
    heading.textContent = `Job ${job.id}: ${job.type}`;
    const active = ACTIVE.has(job.state);
    const parts = [
      h("div", { class: "line big" }, badge(job.state), progressBar(job.progress, "job progress"), h("span", { class: "hint" }, detailOfJob(job))),
      job.error ? h("p", { class: "error", role: "alert" }, job.error) : null,
      definitionList([
        ["What", paramsSummary(job)],
        ["Queue", job.queue],
        ["Worker", job.worker || "–"],
        ["Created", when(job.created_at)],
        ["Started", when(job.started_at)],
        [job.finished_at ? "Finished" : "ETA", job.finished_at ? when(job.finished_at) : when(job.eta)],
      ]),
      active && !job.cancel_requested ? h("div", { class: "actions" }, h("button", { type: "button", class: "danger", id: "cancel-job", onclick: () => cancelJob(job, refresh) }, "Cancel job")) : null,
      job.cancel_requested && active ? h("p", { class: "hint" }, "Cancel requested: the job stops at its next step.") : null,
      links(job),
      job.result?.baseline ? comparisonView(job.result) : null,
      job.metrics ? [h("h2", {}, "Latest metrics"), metricsView(job.metrics)] : null,
      job.result ? h("details", {}, h("summary", { dataset: { focusKey: "result" } }, "Result (JSON)"), h("pre", { class: "json" }, JSON.stringify(job.result, null, 2))) : null,
      h("details", {}, h("summary", { dataset: { focusKey: "params" } }, "Parameters (JSON)"), h("pre", { class: "json" }, JSON.stringify(job.params, null, 2))),
    ];
    rerender(body, () => body.replaceChildren(...parts.flat().filter(Boolean)));
    if (active || lastState !== job.state) {
      const text = await request(`/jobs/${jobId}/logs`, { query: { lines: 200 } }).catch((error) => `(the log could not be read: ${error.message})`);
      const atBottom = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
      logBox.textContent = text || "(empty: no worker has started this job yet)";
      if (atBottom) logBox.scrollTop = logBox.scrollHeight;
    }
    lastState = job.state;
    return active;
  };
  try {
    await refresh();
  } catch (error) {
    body.replaceChildren(errorBox(error));
    return;
  }
  setCleanup(poller(refresh));
}

function links(job) {
  const result = job.result || {};
  const items = [];
  if (job.type === "train" && result.model_id) {
    items.push(h("a", { class: "button", href: `#/models/${result.model_id}` }, `Model ${result.model_name || result.model_id}`));
    items.push(h("a", { class: "button", id: "report-link", href: `#/reports?model=${result.model_id}&dataset=${job.params.dataset_id}` }, "Evaluation report"));
  }
  if (job.type === "evaluate" && job.state === "succeeded") {
    items.push(h("a", { class: "button", id: "report-link", href: `#/reports?model=${job.params.model_id}&dataset=${job.params.dataset_id}` }, "Evaluation report"));
  }
  if ((job.type === "import" || job.type === "index") && job.params.gallery_id) {
    items.push(h("a", { class: "button secondary", href: `#/galleries/${job.params.gallery_id}` }, "Open the gallery"));
  }
  return items.length ? h("div", { class: "actions" }, items) : null;
}

/** The trained model against its baseline (the built-in model unless the job named one) on the
 * same test images, from a train job's result. */
function comparisonView(result) {
  const baseline = result.baseline;
  const kind = baseline.builtin ? "built-in" : "baseline";
  const rows = [
    { model: `${baseline.model_name} (${kind})`, ...baseline.metrics },
    { model: `${result.model_name} (trained)`, ...result.metrics.test },
  ];
  const columns = [{ title: "Model", cell: (row) => row.model }];
  for (const [name, title] of [["recall@1", "Recall@1"], ["map@r", "MAP@R"]]) {
    columns.push({ title, class: "num", cell: (row) => metric(row[name]) });
  }
  const gain = result.gain_over_baseline["recall@1"];
  const verdict = gain > 0 ? `Training helped: Recall@1 +${fmt(gain, 3)}.` : `Training did not help: Recall@1 ${fmt(gain, 3)}; keep the ${kind} model for searches.`;
  return h("section", { id: "baseline-comparison" }, h("h2", {}, `Compared with the ${kind} model`), table(columns, rows, { caption: "Test split (classes never seen in training)" }), h("p", {}, verdict));
}

function metricsView(metrics) {
  const flat = Object.entries(metrics).filter(([, v]) => typeof v === "number" || typeof v === "string");
  const nested = Object.entries(metrics).filter(([, v]) => v && typeof v === "object");
  return h(
    "div",
    {},
    flat.length ? definitionList(flat.map(([k, v]) => [k, fmt(v, 4)])) : null,
    nested.map(([split, values]) =>
      table(
        Object.keys(values).map((name) => ({ title: name, class: "num", cell: (row) => metric(row[name]) })),
        [values],
        { caption: split },
      ),
    ),
  );
}
