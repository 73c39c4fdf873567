// Search by picture: a gallery, a query (a file dropped/chosen/pasted, or an image already in
// the gallery: "more like this"), k and a label filter; the predicted label above the results.

import { API, get, loadImage, request, thumbnailUrl } from "../api.js";
import { dropZone, empty, errorBox, field, fmt, h, metadataList, select } from "../ui.js";

const DEFAULT_K = 12;

function parseLabels(text) {
  return text
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
}

/** Similarity-weighted vote of the results' labels (for "more like this", which uploads nothing). */
function voteOf(results) {
  const votes = new Map();
  for (const hit of results) {
    if (!hit.label) continue;
    const vote = votes.get(hit.label) || { label: hit.label, count: 0, score: 0 };
    vote.count += 1;
    vote.score += Math.max(hit.score, 0);
    votes.set(hit.label, vote);
  }
  const sorted = [...votes.values()].sort((a, b) => b.score - a.score);
  const total = sorted.reduce((sum, v) => sum + v.score, 0);
  return sorted.length
    ? { label: sorted[0].label, confidence: total ? sorted[0].score / total : 0, votes: sorted }
    : { label: null, confidence: 0, votes: [] };
}

export async function searchPage(main, { query, setCleanup }) {
  main.append(h("h1", {}, "Search by picture"));
  const galleries = await get("/galleries");
  if (!galleries.length) {
    main.append(
      empty(
        "There is no gallery to search yet. Create one and upload pictures to it first.",
        h("a", { href: "#/galleries", class: "button" }, "Go to Galleries"),
      ),
    );
    return;
  }
  const wanted = query.get("gallery");
  const gallerySelect = select(
    galleries.map((g) => [String(g.id), `${g.name} (${g.image_count} images)`]),
    { id: "search-gallery", name: "gallery" },
  );
  if (wanted && galleries.some((g) => String(g.id) === wanted)) gallerySelect.value = wanted;
  const kInput = h("input", { id: "search-k", type: "number", min: 1, max: 200, value: query.get("k") || DEFAULT_K, inputmode: "numeric" });
  const labelInput = h("input", { id: "search-labels", type: "text", placeholder: "e.g. cat, dog", value: query.get("label") || "" });
  const queryBox = h("section", { class: "query", "aria-label": "Query" });
  const prediction = h("section", { class: "prediction", id: "prediction", "aria-live": "polite", "aria-label": "Predicted label" });
  const status = h("p", { class: "status", id: "search-status", "aria-live": "polite" });
  const resultsBox = h("section", { id: "results", "aria-label": "Results" });
  let current = null; // {file} | {imageId}

  const zone = dropZone({
    label: "Drop an image here, choose a file, or paste one (Ctrl+V)",
    id: "search-file",
    paste: true,
    onFiles: ([file]) => {
      current = { file };
      run();
    },
  });
  setCleanup(() => zone.cleanup && zone.cleanup());

  const form = h(
    "form",
    { class: "search-form", id: "search-form" },
    h(
      "div",
      { class: "row" },
      field("Gallery", gallerySelect),
      field("Results (k)", kInput),
      field("Only labels", labelInput, "Comma-separated; empty for all."),
    ),
    zone,
    h("div", { class: "actions" }, h("button", { type: "submit", id: "search-submit" }, "Search again")),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  gallerySelect.addEventListener("change", () => {
    history.replaceState(null, "", `#/search?gallery=${gallerySelect.value}`);
    if (current && current.file) run();
    else {
      current = null; // an image id belongs to the other gallery
      queryBox.replaceChildren();
      resultsBox.replaceChildren();
      prediction.replaceChildren();
    }
  });
  main.append(form, status, h("div", { class: "search-layout" }, queryBox, h("div", {}, prediction, resultsBox)));

  function showQuery() {
    queryBox.replaceChildren(h("h2", {}, "Query"));
    const img = h("img", { class: "query-image", alt: "The query image" });
    if (current.file) {
      img.src = URL.createObjectURL(current.file);
      queryBox.append(img, h("p", { class: "hint" }, current.file.name || "pasted image"));
    } else {
      loadImage(img, thumbnailUrl(current.imageId));
      img.alt = `Gallery image ${current.imageId}`;
      queryBox.append(img, h("p", { class: "hint" }, `Image ${current.imageId} of the gallery (more like this)`));
    }
  }

  async function run() {
    if (!current) {
      status.textContent = "Choose, drop or paste an image first.";
      return;
    }
    const galleryId = gallerySelect.value;
    const k = Math.max(1, parseInt(kInput.value, 10) || DEFAULT_K);
    const labels = parseLabels(labelInput.value);
    showQuery();
    status.textContent = "Searching…";
    resultsBox.replaceChildren();
    prediction.replaceChildren();
    try {
      let found;
      let predicted;
      if (current.file) {
        const searchForm = new FormData();
        searchForm.append("image", current.file, current.file.name || "query.png");
        searchForm.append("k", String(k));
        for (const label of labels) searchForm.append("label", label);
        const classifyForm = new FormData();
        classifyForm.append("images", current.file, current.file.name || "query.png");
        classifyForm.append("k", String(Math.min(k, 25)));
        const [searched, classified] = await Promise.all([
          request(`/galleries/${galleryId}/search`, { method: "POST", form: searchForm }),
          request(`/galleries/${galleryId}/classify`, { method: "POST", form: classifyForm }).catch((error) => ({ error })),
        ]);
        found = searched;
        predicted = classified.error ? { error: classified.error } : { ...classified.predictions[0], source: "classify" };
      } else {
        found = await request(`/images/${current.imageId}/similar`, { query: { k, label: labels } });
        predicted = { ...voteOf(found.results), source: "vote" };
      }
      showPrediction(predicted);
      showResults(found);
      status.textContent = `${found.results.length} results in ${fmt(found.took_ms, 1)} ms (model ${found.model_id}, index version ${found.index_version}).`;
    } catch (error) {
      status.textContent = "";
      resultsBox.replaceChildren(errorBox(error, "The search failed"));
    }
  }

  function showPrediction(predicted) {
    if (predicted.error) {
      prediction.replaceChildren(h("p", { class: "hint" }, `No predicted label: ${predicted.error.message}`));
      return;
    }
    if (!predicted.label) {
      prediction.replaceChildren(h("p", { class: "hint" }, "No predicted label: no labelled neighbour."));
      return;
    }
    const votes = (predicted.votes || []).slice(0, 4).map((v) => `${v.label} ${v.count}`).join(", ");
    prediction.replaceChildren(
      h(
        "div",
        { class: "predicted" },
        h("span", { class: "hint" }, predicted.source === "classify" ? "Predicted label (kNN vote)" : "Most likely label (vote of these results)"),
        h("strong", { id: "predicted-label" }, predicted.label),
        h("span", {}, ` confidence ${fmt(predicted.confidence, 2)}`),
        votes ? h("span", { class: "hint" }, ` · votes: ${votes}`) : null,
        predicted.cluster_label ? h("span", { class: "hint" }, ` · cluster classifier: ${predicted.cluster_label}`) : null,
      ),
    );
  }

  function showResults(found) {
    if (!found.results.length) {
      resultsBox.replaceChildren(empty("No result: the gallery is empty or no image matches the label filter."));
      return;
    }
    resultsBox.replaceChildren(
      h("h2", {}, "Most similar"),
      h(
        "ol",
        { class: "grid results" },
        found.results.map((hit, rank) => {
          const img = h("img", { alt: `Result ${rank + 1}: image ${hit.image_id}${hit.label ? `, ${hit.label}` : ""}`, loading: "lazy", width: 160, height: 160 });
          loadImage(img, thumbnailUrl(hit.image_id));
          return h(
            "li",
            { class: "card result", dataset: { imageId: hit.image_id } },
            h("a", { href: `${API}/images/${hit.image_id}/file`, target: "_blank", rel: "noopener", class: "thumb" }, img),
            h(
              "div",
              { class: "card-body" },
              h("div", { class: "line" }, h("span", { class: "score", title: "cosine similarity" }, Number(hit.score).toFixed(3)), hit.label ? h("span", { class: "tag label" }, hit.label) : h("span", { class: "hint" }, "no label")),
              hit.external_id ? h("div", { class: "hint" }, `id ${hit.external_id}`) : null,
              metadataList(hit.metadata),
              h(
                "button",
                {
                  type: "button",
                  class: "secondary small more-like-this",
                  onclick: () => {
                    current = { imageId: hit.image_id };
                    run();
                    form.scrollIntoView({ behavior: "smooth" });
                  },
                },
                "More like this",
              ),
            ),
          );
        }),
      ),
    );
  }

  const imageParam = query.get("image");
  if (imageParam) {
    current = { imageId: parseInt(imageParam, 10) };
    run();
  }
}
