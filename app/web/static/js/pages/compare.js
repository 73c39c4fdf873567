// Model comparison: two models' metrics side by side on the same split of one dataset (each
// model's latest evaluation there, or its own training's numbers when it trained on it) and
// their Recall@K curves on one plot; a model not yet measured there can be evaluated from here.

import { API, get, post, showPng } from "../api.js";
import { empty, errorBox, field, h, metric, select, table, toast } from "../ui.js";

const METRICS = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi", "f1"];
const SPLITS = [["test", "test"], ["train", "train"], ["val", "validation (training's only)"]];

export async function comparePage(main, { query, navigate }) {
  main.append(h("h1", {}, "Compare models"));
  const [models, datasets] = await Promise.all([get("/models"), get("/datasets").catch(() => [])]);
  const ready = datasets.filter((d) => d.status === "ready");
  if (models.length < 2 || !ready.length) {
    main.append(empty("Comparing needs two models and a ready dataset (register one on the Jobs page)."));
    return;
  }
  const chosen = (query.get("models") || "").split(",").filter(Boolean);
  const options = models.map((m) => [String(m.id), `${m.name} (${m.method})`]);
  const first = select(options, { id: "compare-a" });
  const second = select(options, { id: "compare-b" });
  first.value = chosen[0] || String(models[0].id);
  second.value = chosen[1] || String(models[models.length - 1].id);
  const dataset = select(ready.map((d) => [String(d.id), d.name]), { id: "compare-dataset" });
  dataset.value = query.get("dataset") || String(ready[ready.length - 1].id);
  const split = select(SPLITS, { id: "compare-split" });
  split.value = query.get("split") || "test";
  const form = h(
    "form",
    { class: "row inline", id: "compare-form" },
    field("Model A", first),
    field("Model B", second),
    field("Dataset", dataset),
    field("Split", split),
    h("button", { type: "submit" }, "Compare"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    navigate(`/compare?models=${first.value},${second.value}&dataset=${dataset.value}&split=${split.value}`);
  });
  main.append(form);
  if (chosen.length < 2) {
    main.append(empty("Choose two models and the split to compare them on."));
    return;
  }
  if (chosen[0] === chosen[1]) {
    main.append(empty("Choose two different models."));
    return;
  }

  const params = { models: chosen, dataset_id: dataset.value, split: split.value };
  let comparison;
  try {
    comparison = await get("/reports/compare", params);
  } catch (error) {
    main.append(errorBox(error, "No comparison"));
    return;
  }
  const entries = comparison.models;
  const names = METRICS.filter((m) => entries.some((e) => m in e.metrics));
  const best = Object.fromEntries(names.map((m) => [m, Math.max(...entries.map((e) => e.metrics[m] ?? -Infinity))]));
  main.append(
    h("p", { class: "lead" }, `On the ${comparison.split} split of ${comparison.dataset.name}.`),
    names.length
      ? table(
          [
            { title: "Metric", cell: (name) => name },
            ...entries.map((entry) => ({
              title: entry.model.name,
              class: "num",
              cell: (name) => h("span", { class: entry.metrics[name] === best[name] && entries.length > 1 ? "better" : "" }, metric(entry.metrics[name])),
            })),
          ],
          names,
          { caption: "Side by side (the better value in bold)" },
        )
      : empty("Neither model has metrics on this split yet."),
  );
  for (const cell of main.querySelectorAll("span.better")) cell.parentElement.classList.add("better");

  const sources = h("ul", { id: "compare-sources" });
  for (const entry of entries) {
    const line = h("li", {}, h("a", { href: `#/models/${entry.model.id}` }, entry.model.name), ": ");
    if (entry.source) {
      line.append(entry.job_id ? h("a", { href: `#/jobs/${entry.job_id}` }, entry.source) : entry.source);
    } else if (comparison.split === "val") {
      line.append("no validation metrics (only training measures them)");
    } else {
      const evaluate = h("button", { type: "button", class: "secondary small", dataset: { modelId: entry.model.id } }, "Evaluate on this split");
      evaluate.addEventListener("click", async () => {
        try {
          const job = await post("/jobs", { type: "evaluate", params: { model_id: entry.model.id, dataset_id: comparison.dataset.id, split: comparison.split } });
          toast(`Evaluation job ${job.id} queued; compare again when it is done.`);
        } catch (error) {
          toast(`Not started: ${error.message}`, "error");
        }
      });
      line.append("not measured on this split yet ", evaluate);
    }
    sources.append(line);
  }
  main.append(h("h2", {}, "Where the numbers come from"), sources);

  const img = h("img", { alt: "Recall@K of both models", class: "plot", hidden: true, id: "compare-plot" });
  const status = h("p", { class: "hint" }, "Rendering…");
  const plotQuery = new URLSearchParams([...chosen.map((id) => ["models", id]), ["dataset_id", dataset.value], ["split", split.value]]);
  main.append(h("figure", { class: "panel plot-figure" }, h("h3", {}, "Recall@K"), status, img));
  showPng(`${API}/reports/compare.png?${plotQuery}`, img, status, img, errorBox);
}
