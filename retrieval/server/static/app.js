// The page of `retrieval serve`: plain JS, no build step. Talks to /api/search and /api/info.
"use strict";

const $ = (sel) => document.querySelector(sel);
const els = {
  form: $("#search-form"), q: $("#q"), file: $("#file"), k: $("#k"), weight: $("#weight"), weightOut: $("#weight-out"),
  weightBox: $("#weight-box"), status: $("#status"), results: $("#results"), info: $("#info"),
  queryImage: $("#query-image"), queryThumb: $("#query-thumb"), queryLabel: $("#query-label"),
  clearImage: $("#clear-image"), overlay: $("#drop-overlay"),
  after: $("#after"), before: $("#before"), camera: $("#camera"),
};

// date taken and camera filters, sent with every search (GET parameters or form fields)
function filterEntries() {
  const out = [];
  for (const name of ["after", "before", "camera"]) {
    const v = els[name].value.trim();
    if (v) out.push([name, v]);
  }
  return out;
}

// The image part of the query: an uploaded File, or an indexed image id ("more like this"), or nothing.
const state = { file: null, fileUrl: null, id: null, idLabel: "", idThumb: "" };
let inflight = null;

function to() { return document.querySelector('input[name="to"]:checked').value; }
function setTo(value) {
  const input = document.querySelector(`input[name="to"][value="${value === "captions" ? "captions" : "images"}"]`);
  input.checked = true;
}

function basename(p) { return (p || "").split(/[\\/]/).pop(); }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

function setStatus(text, isError = false) {
  els.status.textContent = text;
  els.status.classList.toggle("error", isError);
}

function refreshQueryImage() {
  const has = Boolean(state.file || state.id !== null);
  els.queryImage.hidden = !has;
  if (state.file) {
    els.queryThumb.src = state.fileUrl;
    els.queryLabel.textContent = `image: ${state.file.name || "pasted image"}`;
  } else if (state.id !== null) {
    els.queryThumb.src = state.idThumb;
    els.queryLabel.textContent = `more like: ${state.idLabel}`;
  }
  const composite = has && els.q.value.trim() !== "";
  els.weightBox.classList.toggle("inactive", !composite);
}

function clearImage() {
  if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
  Object.assign(state, { file: null, fileUrl: null, id: null, idLabel: "", idThumb: "" });
  els.file.value = "";
  refreshQueryImage();
}

function useFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image`, true);
    return;
  }
  clearImage();
  state.file = file;
  state.fileUrl = URL.createObjectURL(file);
  refreshQueryImage();
  search();
}

function moreLike(id, label, thumb) {
  clearImage();
  Object.assign(state, { id, idLabel: label, idThumb: thumb });
  refreshQueryImage();
  window.scrollTo({ top: 0, behavior: "smooth" });
  search();
}

function urlParams() {
  const p = new URLSearchParams();
  const q = els.q.value.trim();
  if (q) p.set("q", q);
  if (state.id !== null) p.set("id", state.id);
  p.set("k", els.k.value);
  p.set("to", to());
  if (q && state.id !== null) p.set("weight", els.weight.value);
  for (const [name, v] of filterEntries()) p.set(name, v);
  return p;
}

async function search({ push = true } = {}) {
  const q = els.q.value.trim();
  refreshQueryImage();
  if (!q && !state.file && state.id === null) {
    setStatus("Type a description, or choose an image.");
    return;
  }
  if (inflight) inflight.abort();
  const ctrl = new AbortController();
  inflight = ctrl;
  setStatus("Searching…");
  els.results.classList.add("busy");
  const t0 = performance.now();
  let resp;
  try {
    if (state.file) {
      const fd = new FormData();
      fd.append("image", state.file, state.file.name || "image");
      if (q) { fd.append("q", q); fd.append("weight", els.weight.value); }
      fd.append("k", els.k.value);
      fd.append("to", to());
      for (const [name, v] of filterEntries()) fd.append(name, v);
      resp = await fetch("/api/search", { method: "POST", body: fd, signal: ctrl.signal });
    } else {
      const params = urlParams();
      if (state.id !== null) params.set("exclude_self", "true");
      resp = await fetch(`/api/search?${params}`, { signal: ctrl.signal });
      if (push) {
        const shown = urlParams();
        shown.delete("k");
        const url = `?${shown}`;
        if (url !== location.search) history.pushState({ label: state.idLabel, thumb: state.idThumb }, "", url);
      }
    }
    const body = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
    if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
    render(body.results);
    const secs = ((performance.now() - t0) / 1000).toFixed(2);
    const n = body.results.length;
    setStatus(n ? `${n} result${n === 1 ? "" : "s"} in ${secs} s` : "No results.");
  } catch (err) {
    if (err.name === "AbortError") return;
    els.results.replaceChildren();
    setStatus(err.message, true);
  } finally {
    if (inflight === ctrl) {
      inflight = null;
      els.results.classList.remove("busy");
    }
  }
}

function render(results) {
  const captions = results.length && results[0].kind === "caption";
  els.results.classList.toggle("list", Boolean(captions));
  els.results.classList.toggle("grid", !captions);
  els.results.replaceChildren(...results.map(captions ? captionRow : imageCard));
}

function imageCard(r) {
  const name = basename(r.path);
  const card = el("figure", { class: "card result", tabindex: "0", "data-id": r.id, title: `${r.path}\nclick: more like this` },
    el("img", { src: r.thumb, alt: name, loading: "lazy", width: "256", height: "256" }),
    el("figcaption", {},
      el("div", { class: "meta" },
        el("span", { class: "rank", text: `#${r.rank}` }),
        el("span", { class: "score", text: r.score.toFixed(3) }),
        el("a", { class: "open", href: r.file, target: "_blank", rel: "noopener", text: "open", title: "Open the original" })),
      el("span", { class: "path" }, el("bdi", { text: r.path })),
      photoMeta(r),
      r.captions && r.captions.length ? el("div", { class: "caps", text: r.captions[0] }) : null));
  const go = (e) => {
    if (e.target.closest("a")) return;
    moreLike(r.id, name, r.thumb);
  };
  card.addEventListener("click", go);
  card.addEventListener("keydown", (e) => { if (e.key === "Enter") go(e); });
  return card;
}

// "2019-07-14 10:30 · Canon EOS R5": the date taken (or the file's date, marked) and the camera
function cameraName(r) {
  const make = r.camera_make || "", model = r.camera_model || "";
  if (make && model.toLowerCase().startsWith(make.split(" ")[0].toLowerCase())) return model;
  return [make, model].filter(Boolean).join(" ");
}

function photoMeta(r) {
  if (!r.taken_at && !r.camera_make && !r.camera_model) return null;
  const parts = [];
  if (r.taken_at) {
    const when = r.taken_at.slice(0, 16).replace("T", " ");
    parts.push(el("time", { class: "taken", datetime: r.taken_at, text: when,
      title: r.taken_source === "exif" ? "date taken (EXIF)" : "file date (no EXIF date)" }));
    if (r.taken_source !== "exif") parts.push(el("span", { class: "muted", text: " (file)" }));
  }
  const cam = cameraName(r);
  if (cam) parts.push(el("span", { class: "camera", text: `${parts.length ? " · " : ""}${cam}`, title: r.lens || "" }));
  return el("div", { class: "photo-meta" }, ...parts);
}

function captionRow(r) {
  const clickable = r.image_id !== null && r.image_id !== undefined;
  const row = el("div", { class: `caption-row result${clickable ? " clickable" : ""}`, "data-id": r.id },
    r.thumb ? el("img", { src: r.thumb, alt: "", loading: "lazy" }) : null,
    el("div", { class: "body" },
      el("div", { class: "meta" },
        el("span", { class: "rank", text: `#${r.rank}` }),
        el("span", { class: "score", text: r.score.toFixed(3) })),
      el("div", { class: "text", text: r.caption }),
      r.path ? el("span", { class: "path" }, el("bdi", { text: r.path })) : null));
  if (clickable) {
    row.title = "click: images like this caption's image";
    row.addEventListener("click", () => { setTo("images"); moreLike(r.image_id, basename(r.path), r.thumb); });
  }
  return row;
}

// -- wiring ------------------------------------------------------------------------------------------

els.form.addEventListener("submit", (e) => { e.preventDefault(); search(); });
els.file.addEventListener("change", () => useFile(els.file.files[0]));
els.clearImage.addEventListener("click", () => { clearImage(); if (els.q.value.trim()) search(); else setStatus(""); });
els.weight.addEventListener("input", () => { els.weightOut.value = Number(els.weight.value).toFixed(2); });
els.weight.addEventListener("change", () => { if (els.q.value.trim() && (state.file || state.id !== null)) search(); });
els.q.addEventListener("input", refreshQueryImage);
for (const r of document.querySelectorAll('input[name="to"]')) r.addEventListener("change", () => search());
els.k.addEventListener("change", () => search());
for (const f of [els.after, els.before, els.camera]) f.addEventListener("change", () => search());

// drag and drop anywhere on the page, and paste
let dragDepth = 0;
const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
document.addEventListener("dragenter", (e) => { if (hasFiles(e)) { dragDepth++; els.overlay.hidden = false; } });
document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; els.overlay.hidden = true; } });
document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
document.addEventListener("drop", (e) => {
  if (!hasFiles(e)) return;
  e.preventDefault();
  dragDepth = 0;
  els.overlay.hidden = true;
  useFile(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const item = Array.from(e.clipboardData ? e.clipboardData.items : []).find((i) => i.type.startsWith("image/"));
  if (item) { e.preventDefault(); useFile(item.getAsFile()); }
});

function fromLocation() {
  const p = new URLSearchParams(location.search);
  els.q.value = p.get("q") || "";
  for (const name of ["after", "before", "camera"]) els[name].value = p.get(name) || "";
  setTo(p.get("to") || "images");
  if (p.get("weight")) { els.weight.value = p.get("weight"); els.weightOut.value = Number(els.weight.value).toFixed(2); }
  clearImage();
  const id = p.get("id");
  if (id && /^\d+$/.test(id)) {
    const st = history.state || {};
    Object.assign(state, { id: Number(id), idLabel: st.label || `image ${id}`, idThumb: st.thumb || `/thumb/${id}` });
  }
  refreshQueryImage();
  if (els.q.value || state.id !== null) search({ push: false });
  else { els.results.replaceChildren(); setStatus(""); }
}
window.addEventListener("popstate", fromLocation);

fetch("/api/info")
  .then((r) => r.json())
  .then((i) => {
    if (i.error) throw new Error(i.error);
    const parts = [`${i.images} images`];
    if (i.captions) parts.push(`${i.captions} captions`);
    parts.push(i.model);
    if (i.fusion) parts.push(`fusion ${i.fusion}`);
    els.info.textContent = parts.join(" · ");
    els.info.title = i.path;
  })
  .catch((err) => setStatus(err.message, true));

fromLocation();
