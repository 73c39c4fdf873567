// A gallery's actions beyond upload and browse: re-index with another model (a job), index
// settings (the ranges come from GET /index-types), import an archive (upload progress) or a
// server folder (a job), and clusters (a cluster job, shown as rows of thumbnails).

import { API, get, loadImage, post, request, thumbnailUrl, uploadWithProgress } from "../api.js";
import { empty, errorBox, field, fmt, h, progressBar, select, toast, when } from "../ui.js";
import { followJob } from "./jobs.js";

const CLUSTERS_PER_PAGE = 12;
const ARCHIVES = ".zip,.tar,.tgz,.tar.gz,.tar.bz2,.tar.xz,.gz,.bz2,.xz";

function thumbnail(image) {
  const img = h("img", { alt: `Image ${image.id}${image.label ? `, ${image.label}` : ""}`, loading: "lazy", width: 96, height: 96 });
  loadImage(img, thumbnailUrl(image.id));
  return h(
    "li",
    { class: "mini-thumb", dataset: { imageId: image.id } },
    h("a", { href: `${API}/images/${image.id}/file`, target: "_blank", rel: "noopener", title: image.label || `#${image.id}` }, img),
  );
}

/** Re-index with another model (an index job) and change the index type or parameters. */
export async function indexPanels(gallery, models, { refresh, follow }) {
  const types = await get("/index-types");
  const section = h("section", { class: "panel", "aria-labelledby": "index-title" }, h("h2", { id: "index-title" }, "Model and index"));

  // ---------------------------------------------------------------- re-index
  const modelChoice = select(
    models.map((m) => [String(m.id), `${m.name} (${m.method}, ${m.embedding_dim}-d)${m.id === gallery.model_id ? " — current" : ""}`]),
    { id: "reindex-model" },
  );
  modelChoice.value = String(gallery.model_id);
  const reindexStatus = h("div", { id: "reindex-status", "aria-live": "polite" });
  const reindex = h(
    "form",
    { id: "reindex-form" },
    h("h3", {}, "Re-index with a model"),
    h("p", { class: "hint" }, "Embeds every picture with the chosen model, then switches the gallery to it in one step; searches keep answering from the current index meanwhile."),
    h("div", { class: "row inline" }, field("Model", modelChoice), h("button", { type: "submit" }, "Re-index")),
    reindexStatus,
  );
  reindex.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const job = await post("/jobs", { type: "index", params: { gallery_id: gallery.id, model_id: parseInt(modelChoice.value, 10) } });
      toast(`Re-index job ${job.id} queued.`);
      follow(followJob(job.id, reindexStatus, (done) => {
        if (done.state === "succeeded") toast(`Gallery re-indexed with model ${done.result.model_id} (index version ${done.result.index_version}).`);
        refresh();
      }));
    } catch (error) {
      reindexStatus.replaceChildren(errorBox(error, "Not started"));
    }
  });

  // ---------------------------------------------------------------- index settings
  const typeChoice = select(types.map((t) => [t.type, t.type]), { id: "index-type" });
  typeChoice.value = gallery.index_type;
  const paramFields = h("div", { class: "row", id: "index-params" });
  const settingsMessage = h("div", { "aria-live": "polite" });
  const inputs = new Map();
  const renderParams = () => {
    inputs.clear();
    const spec = types.find((t) => t.type === typeChoice.value);
    paramFields.replaceChildren(
      ...spec.params.map((param) => {
        const input = h("input", {
          type: "number",
          id: `index-param-${param.name}`,
          name: param.name,
          min: param.integer ? param.min : undefined,
          max: param.max,
          step: param.integer ? 1 : 0.01,
          placeholder: `default ${param.default}`,
        });
        if (!param.integer) input.min = "0.01";
        const current = gallery.index_type === typeChoice.value ? gallery.index_params[param.name] : undefined;
        if (current !== undefined) input.value = String(current);
        inputs.set(param.name, input);
        return field(param.name, input, `${param.description}; ${param.expected}.`);
      }),
    );
  };
  typeChoice.addEventListener("change", renderParams);
  renderParams();
  const settings = h(
    "form",
    { id: "index-settings-form" },
    h("h3", {}, "Index type and parameters"),
    h("p", { class: "hint" }, "Rebuilt from the stored embeddings (nothing is embedded again); leave a field empty for its default."),
    h("div", { class: "row inline" }, field("Index type", typeChoice)),
    paramFields,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "secondary" }, "Apply")),
    settingsMessage,
  );
  settings.addEventListener("submit", async (event) => {
    event.preventDefault();
    settingsMessage.replaceChildren();
    const params = {};
    for (const [name, input] of inputs) if (input.value.trim() !== "") params[name] = Number(input.value);
    try {
      const updated = await request(`/galleries/${gallery.id}`, { method: "PATCH", json: { index_type: typeChoice.value, index_params: params } });
      Object.assign(gallery, updated);
      settingsMessage.replaceChildren(h("p", { class: "status", id: "index-settings-result" }, `Index rebuilt: ${updated.index_type}, version ${updated.index_version}.`));
      refresh();
    } catch (error) {
      settingsMessage.replaceChildren(errorBox(error, "Not changed"));
    }
  });

  section.append(reindex, settings);
  return section;
}

/** Import an archive (uploaded with a progress bar) or a folder under the server's dataset root. */
export function importPanel(galleryId, { refresh, follow }) {
  const archive = h("input", { type: "file", id: "import-archive", accept: ARCHIVES });
  const labels = h("input", { type: "checkbox", id: "import-labels", checked: true });
  const folder = h("input", { type: "text", id: "import-folder", autocomplete: "off", placeholder: "e.g. photos/2024" });
  const status = h("div", { id: "import-status", "aria-live": "polite" });
  const done = (job) => {
    if (job.state === "succeeded") {
      const r = job.result || {};
      status.append(h("p", { class: "status", id: "import-result" }, `${fmt(r.added)} added, ${fmt(r.duplicate)} already there, ${fmt(r.rejected)} rejected.`));
    }
    refresh();
  };
  const archiveForm = h(
    "form",
    { class: "row inline", id: "import-archive-form" },
    field("Archive (zip or tar)", archive),
    h("button", { type: "submit" }, "Upload and import"),
  );
  archiveForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!archive.files.length) {
      status.replaceChildren(errorBox(new Error("choose an archive first"), "Not started"));
      return;
    }
    const form = new FormData();
    form.append("gallery_id", String(galleryId));
    form.append("label_from_folder", labels.checked ? "true" : "false");
    form.append("archive", archive.files[0], archive.files[0].name);
    const bar = h("div", { id: "import-upload-progress" }, progressBar(0, "archive upload"));
    status.replaceChildren(bar);
    try {
      const job = await uploadWithProgress("/jobs/import", form, (sent, total) => bar.replaceChildren(progressBar(sent / total, "archive upload"), h("span", { class: "hint" }, `${fmt(Math.round(sent / 1024))} of ${fmt(Math.round(total / 1024))} KiB sent`)));
      follow(followJob(job.id, status, done));
    } catch (error) {
      status.replaceChildren(errorBox(error, "Not imported"));
    }
  });
  const folderForm = h(
    "form",
    { class: "row inline", id: "import-folder-form" },
    field("Folder on the server", folder, "Under the server's dataset root (LOOKALIKE_DATASET_ROOT)."),
    h("button", { type: "submit", class: "secondary" }, "Import folder"),
  );
  folderForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const job = await post("/jobs", { type: "import", params: { gallery_id: galleryId, folder: folder.value.trim(), label_from_folder: labels.checked } });
      follow(followJob(job.id, status, done));
    } catch (error) {
      status.replaceChildren(errorBox(error, "Not imported"));
    }
  });
  return h(
    "section",
    { class: "panel", "aria-labelledby": "import-title" },
    h("h2", { id: "import-title" }, "Import many pictures"),
    h("p", { class: "hint" }, "A job adds every image of an archive or a server folder; byte-identical files are stored once."),
    h("label", { class: "check" }, labels, " Label each picture with its folder's name"),
    archiveForm,
    folderForm,
    status,
  );
}

/** Run a cluster job and show a clustering as rows: size, main label, typical thumbnails. */
export async function clustersPanel(galleryId, { follow }) {
  const method = select([["kmeans", "k-means (fast, any size)"], ["agglomerative", "agglomerative (up to 20,000 pictures)"]], { id: "cluster-method" });
  const k = h("input", { type: "number", id: "cluster-k", min: 1, max: 10000, step: 1, placeholder: "by silhouette" });
  const kMax = h("input", { type: "number", id: "cluster-k-max", min: 2, max: 10000, step: 1, value: "50" });
  const status = h("div", { id: "cluster-status", "aria-live": "polite" });
  const view = h("div", { id: "clusters" });
  const form = h(
    "form",
    { class: "row inline", id: "cluster-form" },
    field("Method", method),
    field("Clusters", k, "Empty: the k with the best silhouette."),
    field("At most", kMax, "Largest k tried."),
    h("button", { type: "submit" }, "Find clusters"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const params = { gallery_id: galleryId, method: method.value, k_max: parseInt(kMax.value, 10) || 50 };
    if (k.value.trim()) params.k = parseInt(k.value, 10);
    try {
      const job = await post("/jobs", { type: "cluster", params });
      follow(followJob(job.id, status, (ended) => {
        if (ended.state === "succeeded") show(ended.result.clustering_id, 0);
      }));
    } catch (error) {
      status.replaceChildren(errorBox(error, "Not started"));
    }
  });

  async function show(clusteringId, offset) {
    let clustering;
    try {
      clustering = await get(`/clusterings/${clusteringId}`, { offset, limit: CLUSTERS_PER_PAGE, examples: 8 });
    } catch (error) {
      view.replaceChildren(errorBox(error, "The clusters could not be read"));
      return;
    }
    const chosen = Object.keys(clustering.k_scores).length ? `, k chosen by silhouette among ${Object.keys(clustering.k_scores).join(", ")}` : "";
    const last = Math.min(offset + clustering.clusters.length, clustering.total_clusters);
    view.replaceChildren(
      h(
        "p",
        { class: "status", id: "clusters-summary" },
        `${clustering.total_clusters} clusters of ${fmt(clustering.size)} pictures (${clustering.method}${chosen}; silhouette ${clustering.silhouette ?? "–"}), ${when(clustering.created_at)}`,
      ),
      ...clustering.clusters.map((cluster) =>
        h(
          "div",
          { class: "cluster-row", dataset: { cluster: cluster.cluster } },
          h(
            "p",
            { class: "hint" },
            h("strong", {}, `Cluster ${cluster.cluster + 1}`),
            ` · ${fmt(cluster.size)} pictures`,
            cluster.top_label ? ` · mostly “${cluster.top_label}” (${Math.round(cluster.top_label_share * 100)} %)` : "",
          ),
          h("ul", { class: "mini-thumbs" }, cluster.examples.map(thumbnail)),
        ),
      ),
      h(
        "nav",
        { class: "pager", "aria-label": "Pages of clusters" },
        h("button", { type: "button", class: "secondary", disabled: offset === 0, onclick: () => show(clusteringId, Math.max(0, offset - CLUSTERS_PER_PAGE)) }, "← Larger clusters"),
        h("span", { class: "hint" }, `${offset + 1}–${last} of ${clustering.total_clusters}`),
        h("button", { type: "button", class: "secondary", disabled: last >= clustering.total_clusters, onclick: () => show(clusteringId, offset + CLUSTERS_PER_PAGE) }, "Smaller clusters →"),
      ),
    );
  }

  const section = h(
    "section",
    { class: "panel", "aria-labelledby": "clusters-title" },
    h("h2", { id: "clusters-title" }, "Clusters"),
    h("p", { class: "hint" }, "Groups of similar pictures, found from their embeddings; each row shows a cluster's most typical pictures."),
    form,
    status,
    view,
  );
  const existing = await get(`/galleries/${galleryId}/clusterings`).catch(() => []);
  if (existing.length) await show(existing[0].id, 0);
  else view.replaceChildren(empty("No clustering yet."));
  return section;
}
