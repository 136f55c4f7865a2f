// The near-duplicates page: groups from /api/duplicates, the best-quality photo of each group first.
"use strict";

const $ = (sel) => document.querySelector(sel);
const els = { form: $("#dup-form"), threshold: $("#threshold"), status: $("#status"), groups: $("#groups") };

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

function basename(p) { return (p || "").split(/[\\/]/).pop(); }

function setStatus(text, isError = false) {
  els.status.textContent = text;
  els.status.classList.toggle("error", isError);
}

function memberCard(m, i) {
  const size = m.width && m.height ? `${m.width}×${m.height}` : "";
  return el("figure", { class: `card dup-member${i === 0 ? " best" : ""}`, title: m.path, "data-id": m.id },
    el("a", { href: m.file, target: "_blank", rel: "noopener" },
      el("img", { src: m.thumb, alt: basename(m.path), loading: "lazy", width: "256", height: "256" })),
    el("figcaption", {},
      el("div", { class: "meta" },
        el("span", { class: "score", text: m.score.toFixed(3) }),
        el("span", { class: "size muted", text: size }),
        i === 0 ? el("span", { class: "badge", text: "best" }) : null),
      el("span", { class: "path" }, el("bdi", { text: m.path }))));
}

function render(groups) {
  els.groups.replaceChildren(...groups.map((g, n) =>
    el("section", { class: "dup-group" },
      el("h2", { text: `${n + 1}. ${g.members.length} photos` }),
      el("div", { class: "grid" }, ...g.members.map(memberCard)))));
}

async function load() {
  const threshold = els.threshold.value || "0.95";
  setStatus("Looking for near-duplicates…");
  try {
    const resp = await fetch(`/api/duplicates?threshold=${encodeURIComponent(threshold)}`);
    const body = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
    if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
    render(body.groups);
    const shown = body.groups.length < body.total ? ` (first ${body.groups.length} shown)` : "";
    setStatus(body.total ? `${body.total} group${body.total === 1 ? "" : "s"} of near-duplicates${shown}`
                         : "No near-duplicates at this similarity.");
    const url = `?threshold=${encodeURIComponent(threshold)}`;
    if (url !== location.search) history.replaceState(null, "", url);
  } catch (err) {
    els.groups.replaceChildren();
    setStatus(err.message, true);
  }
}

els.form.addEventListener("submit", (e) => { e.preventDefault(); load(); });
const start = new URLSearchParams(location.search).get("threshold");
if (start) els.threshold.value = start;
fetch("/api/info").then((r) => r.json()).then((i) => { if (!i.error) $("#info").textContent = `${i.images} images`; });
load();
