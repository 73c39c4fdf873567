// Models: the list (method, dimension, headline metrics), a form that builds a model from a
// pretrained backbone on the server, and a model's card.

import { get, request } from "../api.js";
import { definitionList, empty, errorBox, field, fmt, h, metric, table, toast, when } from "../ui.js";

// The built-in backbones (weights shipped with the server); any timm model name works too.
const BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet50"];

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

export async function modelsPage(main, { navigate }) {
  main.append(h("h1", {}, "Models"));
  const models = await get("/models");
  if (!models.length) {
    main.append(empty("No model is registered. Train one on the Jobs page, or add a pretrained one below."));
    main.append(pretrainedForm(navigate));
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
    models.length > 1 ? h("div", { class: "actions" }, h("a", { class: "button secondary", href: "#/compare", id: "compare-link" }, "Compare two models")) : null,
    pretrainedForm(navigate),
  );
}

/** Build a model on the server from a pretrained backbone (POST /models with `backbone`). */
function pretrainedForm(navigate) {
  const name = h("input", { type: "text", id: "pretrained-name", required: true, maxlength: 200, autocomplete: "off" });
  const backbone = h("input", { type: "text", id: "pretrained-backbone", required: true, list: "backbone-choices", value: "efficientnet_lite1", autocomplete: "off" });
  const choices = h("datalist", { id: "backbone-choices" }, BACKBONES.map((b) => h("option", { value: b })));
  const weights = h("input", { type: "file", id: "pretrained-weights", accept: ".safetensors,.pth,.pt,.bin" });
  const size = h("input", { type: "number", id: "pretrained-size", min: 32, max: 1024, step: 1, placeholder: "its own" });
  const message = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "panel", id: "pretrained-form" },
    h("h2", {}, "Add a pretrained model"),
    h("p", { class: "hint" }, "Pooled features of an ImageNet-pretrained backbone, untrained on your data: a built-in (weights ship with the server) or any timm model name with its weights file (without one, the server downloads the weights, which needs internet)."),
    h("div", { class: "row" }, field("Name", name), field("Backbone", backbone), field("Weights file", weights, "Optional: .safetensors, .pth or .bin"), field("Input size (px)", size)),
    choices,
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Add model")),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.replaceChildren(h("p", { class: "hint" }, "Building the model (loading the weights, checking its export)…"));
    const body = new FormData();
    body.append("name", name.value.trim());
    body.append("backbone", backbone.value.trim());
    if (size.value) body.append("image_size", size.value);
    if (weights.files.length) body.append("weights", weights.files[0], weights.files[0].name);
    try {
      const model = await request("/models", { method: "POST", form: body });
      toast(`Model “${model.name}” added.`);
      navigate(`/models/${model.id}`);
    } catch (error) {
      message.replaceChildren(errorBox(error, "Not added"));
    }
  });
  return form;
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
      ["Starting weights", card.backbone_weights && card.backbone_weights.source ? `${card.backbone_weights.source}${card.backbone_weights.sha256 ? ` (SHA-256 ${card.backbone_weights.sha256.slice(0, 16)}…)` : ""}` : null],
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
