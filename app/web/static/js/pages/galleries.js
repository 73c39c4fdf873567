// Galleries: the list (counts, model, index) with a create form; a gallery's page with paged
// thumbnails, a drag-and-drop multi-file upload with one result per file, and delete.

import { API, get, loadImage, post, request, thumbnailUrl } from "../api.js";
import { definitionList, dropZone, empty, errorBox, field, fmt, h, select, table, toast, when } from "../ui.js";
import { clustersPanel, importPanel, indexPanels } from "./gallery-tools.js";

const PAGE_SIZE = 24;
const FILES_PER_REQUEST = 20;
const INDEX_TYPES = [
  ["flat", "flat (exact)"],
  ["hnsw", "hnsw (approximate, fast)"],
  ["ivfpq", "ivfpq (approximate, compact)"],
];

export async function galleriesPage(main, { navigate }) {
  main.append(h("h1", {}, "Galleries"));
  const [galleries, models] = await Promise.all([get("/galleries"), get("/models")]);
  const modelName = new Map(models.map((m) => [m.id, m.name]));
  if (galleries.length) {
    main.append(
      table(
        [
          { title: "Name", cell: (g) => h("a", { href: `#/galleries/${g.id}` }, g.name) },
          { title: "Images", cell: (g) => fmt(g.image_count), class: "num" },
          { title: "Labelled", cell: (g) => fmt(g.labelled_count), class: "num" },
          { title: "Model", cell: (g) => h("a", { href: `#/models/${g.model_id}` }, modelName.get(g.model_id) || `model ${g.model_id}`) },
          { title: "Index", cell: (g) => `${g.index_type} v${g.index_version}` },
          { title: "Vectors", cell: (g) => fmt(g.index_size), class: "num" },
          { title: "Created", cell: (g) => when(g.created_at) },
        ],
        galleries,
        { caption: `${galleries.length} galleries`, rowAttrs: (g) => ({ dataset: { galleryId: g.id } }) },
      ),
    );
  } else {
    main.append(empty("No gallery yet. Create the first one below, then upload pictures to it."));
  }

  if (!models.length) {
    main.append(empty("A gallery needs an embedding model, and none is registered. Register one with POST /api/v1/models or train one on the Jobs page."));
    return;
  }
  const name = h("input", { type: "text", required: true, maxlength: 200, id: "gallery-name", autocomplete: "off" });
  const model = select(models.map((m) => [String(m.id), `${m.name} (${m.method}, ${m.embedding_dim}-d)`]), { id: "gallery-model" });
  const indexType = select(INDEX_TYPES, { id: "gallery-index" });
  const message = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "panel", id: "create-gallery" },
    h("h2", {}, "New gallery"),
    h("div", { class: "row" }, field("Name", name), field("Model", model), field("Index type", indexType)),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Create gallery")),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.replaceChildren();
    try {
      const created = await post("/galleries", { name: name.value, model_id: parseInt(model.value, 10), index_type: indexType.value });
      toast(`Gallery “${created.name}” created.`);
      navigate(`/galleries/${created.id}`);
    } catch (error) {
      message.replaceChildren(errorBox(error, "Not created"));
    }
  });
  main.append(form);
}

export async function galleryPage(main, galleryId, { query, navigate, setCleanup }) {
  const gallery = await get(`/galleries/${galleryId}`);
  const models = await get("/models").catch(() => []);
  const modelName = (id) => models.find((m) => m.id === id)?.name || `model ${id}`;
  const stops = [];
  setCleanup(() => stops.forEach((stop) => stop()));
  main.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/galleries" }, "Galleries"), " / "),
    h("h1", {}, gallery.name),
  );
  const facts = h("div");
  const renderFacts = (g) =>
    facts.replaceChildren(
      definitionList([
        ["Images", h("span", { id: "gallery-count" }, fmt(g.image_count))],
        ["Labelled", fmt(g.labelled_count)],
        ["Model", h("a", { href: `#/models/${g.model_id}`, id: "gallery-model-link" }, modelName(g.model_id))],
        ["Index", h("span", { id: "gallery-index" }, `${g.index_type}, version ${g.index_version}, ${fmt(g.index_size)} vectors`)],
        g.suggested_index_type ? ["Suggestion", `switch to ${g.suggested_index_type} (Model and index, below)`] : null,
        ["Created", when(g.created_at)],
      ]),
    );
  renderFacts(gallery);
  const deleteButton = h("button", { type: "button", class: "danger", id: "delete-gallery" }, "Delete gallery");
  deleteButton.addEventListener("click", async () => {
    if (!confirm(`Delete the gallery “${gallery.name}” and its ${gallery.image_count} images? This cannot be undone.`)) return;
    try {
      await request(`/galleries/${galleryId}`, { method: "DELETE" });
      toast(`Gallery “${gallery.name}” deleted.`);
      navigate("/galleries");
    } catch (error) {
      toast(`Not deleted: ${error.message}`, "error");
    }
  });
  main.append(
    facts,
    h("div", { class: "actions" }, h("a", { class: "button", href: `#/search?gallery=${galleryId}` }, "Search this gallery"), deleteButton),
  );

  // ---------------------------------------------------------------- upload
  const labelAll = h("input", { type: "text", id: "upload-label", maxlength: 200, autocomplete: "off" });
  const results = h("ol", { class: "upload-results", id: "upload-results", "aria-live": "polite" });
  const summary = h("p", { class: "status", id: "upload-summary", "aria-live": "polite" });
  const zone = dropZone({
    label: "Drop pictures here or choose files (many at once)",
    multiple: true,
    id: "upload-files",
    onFiles: (files) => upload(files),
  });
  main.append(
    h(
      "section",
      { class: "panel", "aria-labelledby": "upload-title" },
      h("h2", { id: "upload-title" }, "Add pictures"),
      field("Label for these files", labelAll, "Optional: the class label stored with every file of this upload."),
      zone,
      summary,
      results,
    ),
  );

  async function upload(files) {
    results.replaceChildren();
    const counts = { created: 0, duplicate: 0, rejected: 0 };
    summary.textContent = `Uploading ${files.length} files…`;
    for (let start = 0; start < files.length; start += FILES_PER_REQUEST) {
      const chunk = files.slice(start, start + FILES_PER_REQUEST);
      const form = new FormData();
      for (const file of chunk) {
        form.append("files", file, file.name);
        if (labelAll.value.trim()) form.append("label", labelAll.value.trim());
      }
      let items;
      try {
        const response = await request(`/galleries/${galleryId}/images`, { method: "POST", form, raw: true });
        const text = await response.text();
        let body = null;
        try {
          body = JSON.parse(text);
        } catch {
          body = null;
        }
        if (body && Array.isArray(body.results)) items = body.results;
        else {
          const detail = body && typeof body.detail === "string" ? body.detail : text || response.statusText;
          items = chunk.map((f) => ({ filename: f.name, status: "rejected", error: detail, status_code: response.status }));
        }
      } catch (error) {
        items = chunk.map((f) => ({ filename: f.name, status: "rejected", error: error.message }));
      }
      for (const item of items) {
        counts[item.status] += 1;
        results.append(uploadLine(item));
      }
      summary.textContent = `Uploaded ${Math.min(start + FILES_PER_REQUEST, files.length)} of ${files.length} files…`;
    }
    summary.textContent = `${counts.created} added, ${counts.duplicate} already in the gallery, ${counts.rejected} rejected.`;
    const fresh = await get(`/galleries/${galleryId}`).catch(() => null);
    if (fresh) renderFacts(fresh);
    showPage(0);
  }

  function uploadLine(item) {
    const text = {
      created: `added as image ${item.image?.id}`,
      duplicate: `already in the gallery (image ${item.image?.id})`,
      rejected: `rejected: ${item.error || "no reason given"}`,
    }[item.status];
    return h("li", { class: `upload-${item.status}` }, h("span", { class: "filename" }, item.filename || "(no name)"), " — ", text);
  }

  // ---------------------------------------------------------------- thumbnails
  const labelFilter = h("input", { type: "search", id: "images-label", placeholder: "any label", value: query.get("label") || "" });
  const grid = h("div", { id: "gallery-images" });
  const pager = h("nav", { class: "pager", "aria-label": "Pages of images" });
  const filterForm = h("form", { class: "row inline" }, field("Only the label", labelFilter), h("button", { type: "submit", class: "secondary" }, "Filter"));
  filterForm.addEventListener("submit", (event) => {
    event.preventDefault();
    showPage(0);
  });
  main.append(h("section", { "aria-labelledby": "images-title" }, h("h2", { id: "images-title" }, "Pictures"), filterForm, grid, pager));

  async function showPage(offset) {
    let page;
    try {
      page = await get(`/galleries/${galleryId}/images`, { offset, limit: PAGE_SIZE, label: labelFilter.value.trim() || undefined });
    } catch (error) {
      grid.replaceChildren(errorBox(error, "Pictures could not be listed"));
      return;
    }
    if (!page.items.length) {
      grid.replaceChildren(empty(labelFilter.value.trim() ? "No picture has this label." : "No pictures yet: drop some in the box above."));
      pager.replaceChildren();
      return;
    }
    grid.replaceChildren(
      h(
        "ul",
        { class: "grid thumbs" },
        page.items.map((image) => {
          const img = h("img", { alt: `Image ${image.id}${image.label ? `, ${image.label}` : ""}`, loading: "lazy", width: 140, height: 140 });
          loadImage(img, thumbnailUrl(image.id));
          const remove = h("button", { type: "button", class: "link danger", "aria-label": `Delete image ${image.id}` }, "Delete");
          remove.addEventListener("click", async () => {
            if (!confirm(`Delete image ${image.id}?`)) return;
            try {
              await request(`/images/${image.id}`, { method: "DELETE" });
              toast(`Image ${image.id} deleted.`);
              showPage(offset);
            } catch (error) {
              toast(`Not deleted: ${error.message}`, "error");
            }
          });
          return h(
            "li",
            { class: "card thumb-card", dataset: { imageId: image.id } },
            h("a", { href: `${API}/images/${image.id}/file`, target: "_blank", rel: "noopener", class: "thumb" }, img),
            h(
              "div",
              { class: "card-body" },
              h("div", { class: "line" }, image.label ? h("span", { class: "tag label" }, image.label) : h("span", { class: "hint" }, "no label"), h("span", { class: "hint" }, `#${image.id}`)),
              h("div", { class: "line" }, h("a", { href: `#/search?gallery=${galleryId}&image=${image.id}` }, "Similar"), remove),
            ),
          );
        }),
      ),
    );
    const last = Math.min(offset + page.items.length, page.total);
    pager.replaceChildren(
      h("button", { type: "button", class: "secondary", disabled: offset === 0, onclick: () => showPage(Math.max(0, offset - PAGE_SIZE)) }, "← Previous"),
      h("span", { class: "hint", id: "pager-status" }, `${offset + 1}–${last} of ${page.total}`),
      h("button", { type: "button", class: "secondary", disabled: last >= page.total, onclick: () => showPage(offset + PAGE_SIZE) }, "Next →"),
    );
  }
  await showPage(0);

  // ---------------------------------------------------------------- near duplicates
  const threshold = h("input", { type: "number", id: "duplicates-threshold", min: 0.5, max: 1, step: 0.01, value: "0.95" });
  const groups = h("div", { id: "duplicate-groups", "aria-live": "polite" });
  const findForm = h("form", { class: "row inline", id: "duplicates-form" }, field("Similarity at least", threshold, "Cosine similarity of two pictures, 0.5 to 1."), h("button", { type: "submit", class: "secondary" }, "Find duplicates"));
  findForm.addEventListener("submit", (event) => {
    event.preventDefault();
    showDuplicates();
  });
  main.append(
    h("section", { class: "panel", "aria-labelledby": "duplicates-title" }, h("h2", { id: "duplicates-title" }, "Near duplicates"), h("p", { class: "hint" }, "Re-encoded, resized or lightly edited copies, found with the gallery's index. Keep one picture of a group and the others are deleted."), findForm, groups),
  );

  const refresh = async () => {
    const fresh = await get(`/galleries/${galleryId}`).catch(() => null);
    if (fresh) {
      Object.assign(gallery, fresh);
      renderFacts(fresh);
    }
    showPage(0);
  };
  const follow = (stop) => stops.push(stop);
  main.append(
    await clustersPanel(gallery.id, { follow }),
    importPanel(gallery.id, { refresh, follow }),
    await indexPanels(gallery, models, { refresh, follow }),
  );

  async function showDuplicates() {
    let found;
    try {
      found = await get(`/galleries/${galleryId}/duplicates`, { threshold: threshold.value, limit: 50 });
    } catch (error) {
      groups.replaceChildren(errorBox(error, "Duplicates could not be searched"));
      return;
    }
    if (!found.groups.length) {
      groups.replaceChildren(empty("No two pictures are this similar."));
      return;
    }
    groups.replaceChildren(
      h("p", { class: "status", id: "duplicates-summary" }, `${found.total_groups} groups${found.total_groups > found.groups.length ? `, the ${found.groups.length} largest shown` : ""}`),
      ...found.groups.map((group, index) =>
        h(
          "div",
          { class: "duplicate-group", dataset: { group: index } },
          h("p", { class: "hint" }, `${group.images.length} pictures, similarity ${group.min_score.toFixed(3)}–${group.max_score.toFixed(3)}`),
          h("ul", { class: "grid thumbs" }, group.images.map((image) => duplicateCard(image, group))),
        ),
      ),
    );
  }

  function duplicateCard(image, group) {
    const img = h("img", { alt: `Image ${image.id}${image.label ? `, ${image.label}` : ""}`, loading: "lazy", width: 140, height: 140 });
    loadImage(img, thumbnailUrl(image.id));
    const keep = h("button", { type: "button", class: "secondary small", "aria-label": `Keep image ${image.id}, delete the others of its group` }, "Keep only this");
    keep.addEventListener("click", async () => {
      const others = group.images.filter((other) => other.id !== image.id);
      if (!confirm(`Keep image ${image.id} and delete ${others.length} other pictures of this group?`)) return;
      try {
        for (const other of others) await request(`/images/${other.id}`, { method: "DELETE" });
        toast(`Kept image ${image.id}; deleted ${others.length}.`);
      } catch (error) {
        toast(`Not all deleted: ${error.message}`, "error");
      }
      const fresh = await get(`/galleries/${galleryId}`).catch(() => null);
      if (fresh) renderFacts(fresh);
      showPage(0);
      showDuplicates();
    });
    return h(
      "li",
      { class: "card thumb-card", dataset: { imageId: image.id } },
      h("a", { href: `${API}/images/${image.id}/file`, target: "_blank", rel: "noopener", class: "thumb" }, img),
      h("div", { class: "card-body" }, h("div", { class: "line" }, image.label ? h("span", { class: "tag label" }, image.label) : h("span", { class: "hint" }, "no label"), h("span", { class: "hint" }, `#${image.id}`)), keep),
    );
  }
}
