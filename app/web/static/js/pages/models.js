// Models: the list (method, dimension, headline metrics) and a model's card.

import { get } from "../api.js";
import { definitionList, empty, fmt, h, metric, table, when } from "../ui.js";

const HEADLINE = ["recall@1", "recall@2", "recall@4", "recall@8", "nmi", "f1", "map@r", "r_precision"];

function headline(card, split) {
  const metrics = (card && card.metrics && card.metrics[split]) || {};
  return metrics["recall@1"];
}

export function metricsTable(metricsBySplit, caption) {
  const splits = Object.entries(metricsBySplit || {}).filter(([, v]) => v && typeof v === "object");
  if (!splits.length) return null;
  const names = HEADLINE.filter((name) => splits.some(([, values]) => name in values));
  for (const [, values] of splits) {
    for (const name of Object.keys(values)) if (!names.includes(name) && typeof values[name] === "number") names.push(name);
  }
  return table(
    [{ title: "Split", cell: ([split]) => split }, ...names.map((name) => ({ title: name, class: "num", cell: ([, values]) => metric(values[name]) }))],
    splits,
    { caption },
  );
}

export async function modelsPage(main) {
  main.append(h("h1", {}, "Models"));
  const models = await get("/models");
  if (!models.length) {
    main.append(empty("No model is registered. Train one on the Jobs page, or register an artifact with POST /api/v1/models."));
    return;
  }
  const details = await Promise.all(models.map((m) => get(`/models/${m.id}`).catch(() => m)));
  main.append(
    table(
      [
        { title: "Name", cell: (m) => h("a", { href: `#/models/${m.id}` }, m.name) },
        { title: "Method", cell: (m) => m.method },
        { title: "Dimension", cell: (m) => fmt(m.embedding_dim), class: "num" },
        { title: "Test Recall@1", cell: (m) => metric(headline(m.card, "test")), class: "num" },
        { title: "Val Recall@1", cell: (m) => metric(headline(m.card, "val")), class: "num" },
        { title: "Built in", cell: (m) => (m.builtin ? "yes" : "") },
        { title: "Registered", cell: (m) => when(m.created_at) },
      ],
      details,
      { caption: `${models.length} models`, rowAttrs: (m) => ({ dataset: { modelId: m.id } }) },
    ),
  );
}

export async function modelPage(main, modelId) {
  const model = await get(`/models/${modelId}`);
  const card = model.card || {};
  const architecture = card.architecture || {};
  const preprocessing = card.preprocessing || {};
  const data = card.training_data || {};
  const method = card.method || {};
  main.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/models" }, "Models"), " / "),
    h("h1", {}, model.name),
    definitionList([
      // One "key value" pair per parameter, so a long parameter list wraps instead of widening the page.
      ["Method", `${method.name || model.method}${method.params && Object.keys(method.params).length ? ` (${Object.entries(method.params).map(([k, v]) => `${k} ${JSON.stringify(v)}`).join(", ")})` : ""}`],
      ["Embedding", `${model.embedding_dim} dimensions`],
      ["Backbone", architecture.backbone ? `${architecture.backbone}${architecture.pooling ? `, ${architecture.pooling} pooling` : ""}` : null],
      ["Input", preprocessing.image_size ? `${preprocessing.image_size} px, ${preprocessing.interpolation || ""} interpolation` : null],
      ["Trained on", data.dataset ? `${data.dataset}${data.train ? ` (${data.train.classes} classes, ${data.train.images} images)` : ""}` : "–"],
      ["Built in", model.builtin ? "yes" : "no"],
      ["Registered", when(model.created_at)],
    ]),
    h(
      "div",
      { class: "actions" },
      h("a", { class: "button", href: `#/reports?model=${model.id}` }, "Evaluation report"),
      h("a", { class: "button secondary", href: `#/jobs?evaluate=${model.id}` }, "Evaluate on a dataset"),
    ),
  );
  const metrics = card.metrics || {};
  const splits = Object.fromEntries(Object.entries(metrics).filter(([, v]) => v && typeof v === "object"));
  main.append(
    h("h2", {}, "Metrics on its card"),
    metricsTable(splits, metrics.epoch !== undefined ? `Best model, epoch ${metrics.epoch}` : "Metrics") ||
      empty("This card records no metrics (a pretrained or imported model). Run an evaluation job to measure it."),
    h("details", {}, h("summary", {}, "The whole card (JSON)"), h("pre", { class: "json" }, JSON.stringify(card, null, 2))),
  );
}
