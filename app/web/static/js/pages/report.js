// Evaluation report of a model on a dataset: the metrics table, Recall@K curves, training
// curves, train vs test Recall@1 and a t-SNE map of the test embeddings. The plots are PNGs
// rendered by the server (GET /api/v1/reports/models/{id}/plots/{name}.png).

import { API, get, post, showPng } from "../api.js";
import { empty, errorBox, field, h, metric, select, table, toast } from "../ui.js";

const METRICS = ["recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "map@r", "r_precision"];

const PLOTS = {
  recall: ["Recall@K", "Recall@K for each split and source of metrics."],
  training: ["Training curves", "Training loss and validation Recall@1 per epoch, from the train job's metrics."],
  memorisation: ["Train vs test Recall@1", "A large gap means the model memorised its training classes."],
  tsne: ["t-SNE map of the test embeddings", "Each point is a test image; close points are similar embeddings. With many classes the 10 most frequent are coloured: name others below, or draw thumbnails."],
};

const MISSING = {
  recall: "No metrics yet: run an evaluation job for this model on this dataset.",
  training: "No training curves: this model was not trained by a job of this server (or its run folder is gone).",
  memorisation: "No train-split Recall@1: evaluate the model on the train split (or train with eval_train) to compare.",
  tsne: "Choose a ready dataset to map its test embeddings.",
};

async function plotFigure(url, name) {
  const [title, caption] = PLOTS[name];
  const status = h("p", { class: "hint" }, name === "tsne" ? "Computing the map (embedding the test images, then t-SNE; only the first time)…" : "Rendering…");
  const img = h("img", { alt: `${title} plot`, class: "plot", hidden: true, dataset: { plot: name } });
  const figure = h("figure", { class: "panel plot-figure", id: `plot-${name}` }, h("h3", {}, title), status, img, h("figcaption", { class: "hint" }, caption));
  showPng(url, img, status, figure, errorBox);
  return figure;
}

export async function reportPage(main, { query, navigate }) {
  main.append(h("h1", {}, "Evaluation report"));
  const [models, datasets] = await Promise.all([get("/models"), get("/datasets").catch(() => [])]);
  if (!models.length) {
    main.append(empty("No model is registered yet: train one on the Jobs page."));
    return;
  }
  const modelId = query.get("model") || String(models[models.length - 1].id);
  const datasetId = query.get("dataset") || "";
  const modelSelect = select(models.map((m) => [String(m.id), m.name]), { id: "report-model" });
  modelSelect.value = modelId;
  const datasetSelect = select([["", "the one it was trained on"], ...datasets.map((d) => [String(d.id), `${d.name} (${d.status})`])], { id: "report-dataset" });
  datasetSelect.value = datasetId;
  const form = h(
    "form",
    { class: "row inline", id: "report-form" },
    field("Model", modelSelect),
    field("Dataset", datasetSelect),
    h("button", { type: "submit" }, "Show report"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const dataset = datasetSelect.value ? `&dataset=${datasetSelect.value}` : "";
    navigate(`/reports?model=${modelSelect.value}${dataset}`);
  });
  main.append(form);

  let report;
  try {
    report = await get(`/reports/models/${modelId}`, { dataset_id: datasetId || undefined });
  } catch (error) {
    main.append(errorBox(error, "No report"));
    return;
  }
  const dataset = report.dataset;
  main.append(
    h(
      "p",
      { class: "lead" },
      h("a", { href: `#/models/${report.model.id}` }, report.model.name),
      ` (${report.model.method}, ${report.model.embedding_dim}-d)`,
      dataset ? ` on ${dataset.name}` : " — no dataset chosen",
      report.train_job_id ? [" · trained by ", h("a", { href: `#/jobs/${report.train_job_id}` }, `job ${report.train_job_id}`)] : null,
    ),
  );

  // Metrics table: one row per source (training's val/test/train, each evaluation job).
  main.append(h("h2", {}, "Metrics"));
  if (report.sources.length) {
    const names = METRICS.filter((m) => report.sources.some((s) => m in s.metrics));
    main.append(
      table(
        [
          { title: "Split (source)", cell: (s) => (s.job_id ? h("a", { href: `#/jobs/${s.job_id}` }, s.name) : s.name) },
          ...names.map((m) => ({ title: m, class: "num", cell: (s) => metric(s.metrics[m]) })),
        ],
        report.sources,
        { caption: "Retrieval (Recall@K, MAP@R, R-precision) and clustering (NMI, F1) metrics" },
      ),
    );
  } else {
    main.append(empty(MISSING.recall));
  }

  // Memorisation side by side, in numbers.
  if (report.memorisation) {
    const { train, test } = report.memorisation;
    main.append(
      h(
        "div",
        { class: "side-by-side", id: "memorisation" },
        h("div", { class: "stat" }, h("span", { class: "hint" }, "Train Recall@1"), h("strong", {}, metric(train))),
        h("div", { class: "stat" }, h("span", { class: "hint" }, "Test Recall@1"), h("strong", {}, metric(test))),
        h("div", { class: "stat" }, h("span", { class: "hint" }, "Gap"), h("strong", {}, metric(train - test))),
      ),
    );
  }

  // Start the evaluations that would complete the report.
  if (dataset && dataset.status === "ready") {
    const evaluate = (split) => async () => {
      try {
        const job = await post("/jobs", { type: "evaluate", params: { model_id: report.model.id, dataset_id: dataset.id, split } });
        toast(`Evaluation job ${job.id} (${split}) queued; reload the report when it is done.`);
      } catch (error) {
        toast(`Not started: ${error.message}`, "error");
      }
    };
    main.append(
      h(
        "div",
        { class: "actions" },
        h("button", { type: "button", class: "secondary", onclick: evaluate("test") }, "Evaluate on test"),
        h("button", { type: "button", class: "secondary", onclick: evaluate("train") }, "Evaluate on train (memorisation)"),
      ),
    );
  }

  main.append(h("h2", {}, "Plots"));
  const grid = h("div", { class: "plots", id: "plots" });
  main.append(grid);
  const datasetQuery = dataset ? `?dataset_id=${dataset.id}` : "";
  for (const name of Object.keys(PLOTS)) {
    const url = `${API}/reports/models/${report.model.id}/plots/${name}.png${datasetQuery}`;
    if (name === "tsne" && report.plots.includes(name)) {
      grid.append(await tsneFigure(url));
    } else if (report.plots.includes(name)) {
      grid.append(await plotFigure(url, name));
    } else {
      grid.append(h("figure", { class: "panel plot-figure missing", id: `plot-${name}` }, h("h3", {}, PLOTS[name][0]), empty(MISSING[name])));
    }
  }
}

/** The t-SNE map with its view controls: which classes are coloured, and thumbnails. */
async function tsneFigure(url) {
  const classes = h("input", { type: "text", id: "tsne-classes", autocomplete: "off", placeholder: "e.g. folder, user-home" });
  const thumbnails = h("input", { type: "checkbox", id: "tsne-thumbnails" });
  const holder = h("div", { id: "tsne-holder" });
  const draw = async () => {
    const params = new URLSearchParams(url.includes("?") ? url.split("?")[1] : "");
    for (const name of classes.value.split(",").map((c) => c.trim()).filter(Boolean)) params.append("classes", name);
    if (thumbnails.checked) params.set("thumbnails", "true");
    holder.replaceChildren(await plotFigure(`${url.split("?")[0]}?${params}`, "tsne"));
  };
  const form = h(
    "form",
    { class: "row inline", id: "tsne-form" },
    field("Colour these classes", classes, "Comma-separated class names, up to 20; the others are grey."),
    h("label", { class: "check" }, thumbnails, " Thumbnails"),
    h("button", { type: "submit", class: "secondary" }, "Redraw"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    draw();
  });
  await draw();
  return h("div", { class: "tsne" }, holder, form);
}
