// din-rank's ranking explorer: plain JavaScript, no build step, nothing loaded from elsewhere.
// It uses the public API only: GET ui/suggestions, POST ui/items, POST rank with explain.
// URLs are relative, so the page works behind a proxy that serves the API under a prefix.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const $ = (sel) => document.querySelector(sel);
let limits = null; // from ui/suggestions: max_history, max_candidates, max_explain_top, can_explain
let pinned = null; // the clicked cell, {row, col}
let view = "contribution"; // what the heatmap colours: "contribution" (default) or "weight"
let last = null; // the last answer drawn, {answer, history, catalogue}: redrawn when the view changes

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, body) {
    const detail = body && Array.isArray(body.detail)
      ? " (" + body.detail.map((d) => d.field + ": " + d.message).join("; ") + ")" : "";
    super((body && body.message ? body.message : "HTTP " + status) + detail);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const key = $("#key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

// ------------------------------------------------------------------ small helpers

function ids(text) {
  return text.split(/[\s,]+/).map((s) => s.trim()).filter((s) => s.length > 0);
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

function hue(text) { // a stable colour per category
  let h = 0;
  for (const ch of String(text)) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function shade(t) { // 0..1 -> white .. deep blue (the weights: a sequential scale)
  const light = 97 - 62 * t;
  return "hsl(222, " + Math.round(35 + 45 * t) + "%, " + light.toFixed(1) + "%)";
}

// The contributions: a diverging scale centred on zero. Raised the score: blue; lowered it: orange;
// no effect: white; the strength is |c| / m, m the largest |c| drawn (so both sides share one scale).
const RAISED_HUE = 215, LOWERED_HUE = 28;
function diverging(c, m) {
  const t = m > 0 ? Math.min(1, Math.abs(c) / m) : 0;
  const light = 97 - 55 * t;
  return "hsl(" + (c >= 0 ? RAISED_HUE : LOWERED_HUE) + ", " + Math.round(30 + 60 * t) + "%, " + light.toFixed(1) + "%)";
}

const signed = (x, n) => (x > 0 ? "+" : "") + fmt(x, n);

const fmt = (x, n) => Number(x).toFixed(n === undefined ? 4 : n);

// ------------------------------------------------------------------ start: suggestions

async function loadSuggestions() {
  try {
    const s = await api("GET", "ui/suggestions?users=8&items=" + sampleSize());
    limits = s;
    $("#model").textContent = "model " + s.model_version + " · T = " + s.max_history +
      (s.can_explain ? "" : " · this model cannot explain (re-export it)");
    const list = $("#users");
    const chips = $("#user-chips");
    list.replaceChildren();
    chips.replaceChildren();
    for (const user of s.users) {
      list.append(el("option", { value: user }));
      const chip = el("button", { type: "button", "data-user": user }, user);
      chip.addEventListener("click", () => { $("#user").value = user; $("#history").value = ""; });
      chips.append(chip);
    }
    if (!$("#user").value && s.users.length) $("#user").value = s.users[0];
    if (!$("#candidates").value.trim()) $("#candidates").value = s.items.map((i) => i.item_id).join("\n");
    showError("");
  } catch (e) {
    $("#model").textContent = "";
    showError(e.status === 401 ? "This service needs an API key: enter it above, then press Enter." : String(e.message));
  }
}

function sampleSize() {
  const n = parseInt($("#sample-n").value, 10);
  return Number.isFinite(n) ? Math.min(200, Math.max(1, n)) : 12;
}

async function sample() {
  try {
    const s = await api("GET", "ui/suggestions?users=0&items=" + sampleSize());
    $("#candidates").value = s.items.map((i) => i.item_id).join("\n");
    showError("");
  } catch (e) {
    showError(String(e.message));
  }
}

// ------------------------------------------------------------------ rank

async function rank(event) {
  event.preventDefault();
  const button = $("#rank");
  button.disabled = true;
  showError("");
  try {
    if (!limits) await loadSuggestions();
    const candidates = [...new Set(ids($("#candidates").value))];
    const pasted = ids($("#history").value);
    const body = {
      user_id: $("#user").value.trim(),
      candidates,
      explain: true,
      explain_top: limits ? Math.min(limits.max_explain_top, limits.max_history) : 5,
    };
    // every returned item is explained; the service bounds how many (DIN_MAX_EXPLAIN_ITEMS)
    if (limits && candidates.length > limits.max_explain_items) body.top_k = limits.max_explain_items;
    if (pasted.length) body.history = pasted;
    const answer = await api("POST", "rank", body);
    const T = limits ? limits.max_history : pasted.length;
    const history = behaviours(answer, pasted.slice(0, T));
    const wanted = [...new Set([...answer.items.map((i) => i.item_id), ...history.filter((h) => h !== null)])];
    const catalogue = {};
    for (const item of (await api("POST", "ui/items", { item_ids: wanted })).items) catalogue[item.item_id] = item;
    show(answer, history, catalogue);
  } catch (e) {
    showError(String(e.message));
  } finally {
    button.disabled = false;
  }
}

// Both lists of an item: what raised its score (`because`) and what lowered it (`against`).
const listed = (item) => [...(item.because || []), ...(item.against || [])];

// The behaviour at each position the model saw: from the pasted history, else from the listed ones.
function behaviours(answer, pasted) {
  const n = answer.history_length;
  if (pasted.length) return pasted.slice(0, n);
  const out = new Array(n).fill(null);
  for (const item of answer.items) for (const b of listed(item)) out[b.position] = b.item_id;
  return out;
}

// ------------------------------------------------------------------ draw

function show(answer, history, catalogue) {
  pinned = null;
  last = { answer, history, catalogue };
  $("#results").hidden = false;
  const badges = [
    ["user " + answer.user_id, ""],
    [answer.history_length + " behaviours seen", ""],
    [answer.items.length + " candidates", ""],
    // the version that scored it, and with a routing of several versions in force the user's arm
    [(answer.arm ? "arm " + answer.arm + " · " : "") + answer.model_version, ""],
  ];
  if (answer.degraded) badges.push(["degraded: the history could not be read", "warn"]);
  if (answer.explained === false) badges.push(["not explained", "warn"]);
  const summary = $("#summary");
  summary.replaceChildren(...badges.map(([text, cls]) => el("span", { class: "badge " + cls }, text)));
  if (answer.explain_note) summary.append(el("span", { class: "muted" }, answer.explain_note));

  const body = $("#ranked tbody");
  body.replaceChildren();
  const top = Math.max(...answer.items.map((i) => i.score), 1e-9);
  answer.items.forEach((item, r) => {
    const tr = el("tr", { "data-row": r });
    tr.append(el("td", { class: "num" }, String(r + 1)), el("td", {}, item.item_id));
    tr.append(el("td", {}, category(catalogue, item.item_id)));
    const cell = el("td", { class: "num" });
    cell.append(el("span", { class: "bar", style: "width:" + Math.round(60 * item.score / top) + "px" }));
    cell.append(document.createTextNode(fmt(item.score)));
    tr.append(cell);
    body.append(tr);
  });
  drawHeatmap(answer, history, catalogue);
}

function category(catalogue, id) {
  const item = catalogue[id];
  if (!item) return "?";
  if (!item.known) return "unknown item";
  return item.category === null ? "?" : item.category;
}

function drawHeatmap(answer, history, catalogue) {
  const wrap = $("#heatmap-wrap");
  const n = history.length;
  const rows = answer.items;
  const cells = rows.map((item) => {
    const w = new Array(n).fill(null);
    for (const b of listed(item)) w[b.position] = { weight: b.weight, contribution: b.contribution };
    return w;
  });
  const known = cells.flat().filter((c) => c !== null);
  const ws = known.map((c) => c.weight);
  const lo = ws.length ? Math.min(...ws) : 0;
  const hi = ws.length ? Math.max(...ws) : 1;
  const scale = (w) => (hi > lo ? (w - lo) / (hi - lo) : 1);
  const m = Math.max(0, ...known.map((c) => Math.abs(c.contribution)));
  const fill = (c) => (view === "weight" ? shade(scale(c.weight)) : diverging(c.contribution, m));

  const left = 215;
  const room = Math.max(400, (wrap.clientWidth || 900) - left - 12);
  const cw = Math.max(6, Math.min(30, Math.floor(room / Math.max(n, 1))));
  const ch = 20;
  const topH = 112;
  const font = Math.min(11, cw - 1);
  const every = font >= 8 ? 1 : Math.ceil(8 / cw); // label every column while the labels fit
  const width = left + Math.max(n, 1) * cw + 12;
  const height = topH + rows.length * ch + 24;
  const root = svg("svg", { id: "heatmap", width, height, viewBox: "0 0 " + width + " " + height, role: "img" });
  root.append(svg("title", {}, (view === "weight" ? "attention weights" : "what each behaviour did to each score") + ": candidates x behaviours"));
  const defs = svg("defs");
  const pattern = svg("pattern", { id: "unlisted", width: 6, height: 6, patternUnits: "userSpaceOnUse" });
  pattern.append(svg("rect", { width: 6, height: 6, fill: "#f1f2f5" }), svg("path", { d: "M0 6 L6 0", stroke: "#c9ccd4" }));
  defs.append(pattern);
  root.append(defs);

  // columns: the behaviours, newest first, labelled with their category (colour band) and position
  const cols = svg("g", { class: "cols" });
  history.forEach((item, t) => {
    const cat = item === null ? "?" : category(catalogue, item);
    const g = svg("g", { class: "col", "data-col": t });
    const x = left + t * cw;
    g.append(svg("rect", { x, y: topH - 12, width: cw - 1, height: 8, fill: "hsl(" + hue(cat) + ", 60%, 60%)" }));
    if (t % every === 0) {
      const cx = x + cw / 2 + font / 3;
      g.append(svg("text", { x: cx, y: topH - 16, style: "font-size:" + Math.max(font, 8) + "px", transform: "rotate(-90 " + cx + " " + (topH - 16) + ")" }, cat));
    }
    if (t % 5 === 0) g.append(svg("text", { x, y: topH + rows.length * ch + 14, class: "pos" }, String(t)));
    g.append(svg("title", {}, "position " + t + ": " + (item === null ? "(not listed)" : item) + " (" + cat + ")"));
    cols.append(g);
  });
  root.append(cols);

  // rows: the candidates in ranked order
  rows.forEach((item, r) => {
    const y = topH + r * ch;
    const g = svg("g", { class: "row", "data-row": r, "data-item": item.item_id });
    const cat = category(catalogue, item.item_id);
    g.append(svg("rect", { x: 2, y: y + 3, width: 6, height: ch - 6, fill: "hsl(" + hue(cat) + ", 60%, 60%)" }));
    g.append(svg("text", { class: "label", x: 12, y: y + ch / 2 + 4 }, item.item_id + " (" + cat + ")"));
    cells[r].forEach((c, t) => {
      const attrs = { class: "cell" + (c === null ? " missing" : ""), x: left + t * cw, y, width: cw, height: ch, "data-row": r, "data-col": t };
      if (c !== null) { attrs.fill = fill(c); attrs["data-weight"] = c.weight; attrs["data-contribution"] = c.contribution; }
      const rect = svg("rect", attrs);
      rect.addEventListener("mouseenter", () => describe(answer, history, catalogue, cells, r, t));
      rect.addEventListener("click", () => { pinned = { row: r, col: t }; describe(answer, history, catalogue, cells, r, t); });
      g.append(rect);
    });
    root.append(g);
  });
  root.addEventListener("mouseleave", () => { if (pinned) describe(answer, history, catalogue, cells, pinned.row, pinned.col); });
  wrap.replaceChildren(root);
  drawLegend(answer, n, { lo, hi, m }, known.length < rows.length * n);
  $("#details").textContent = n ? "Hover or click a cell." : "";
}

// The legend: a colour bar with its ends and middle named in words, then what a cell means.
function drawLegend(answer, n, range, unlisted) {
  const legend = $("#legend");
  legend.replaceChildren();
  if (answer.explained === false) { legend.textContent = "Nothing is explained: " + (answer.explain_note || ""); return; }
  if (!n) { legend.textContent = "This user has no behaviours: the scores rest on the candidates alone."; return; }
  const bar = el("div", { class: "scale", id: "scale" });
  const ends = el("div", { class: "scale-labels" });
  if (view === "weight") {
    bar.style.background = "linear-gradient(to right, " + shade(0) + ", " + shade(0.5) + ", " + shade(1) + ")";
    ends.append(el("span", {}, "lowest weight " + fmt(range.lo)), el("span", {}, "highest weight " + fmt(range.hi)));
    legend.append(bar, ends, el("p", {}, "Attention weight: how strongly DIN mixes a behaviour into the user's " +
      "interest vector for this candidate. A large weight does not mean the behaviour raised the score: " +
      "switch to \"What each behaviour did\" for that."));
  } else {
    const stops = [-1, -0.5, 0, 0.5, 1].map((t) => diverging(t * range.m, range.m));
    bar.style.background = "linear-gradient(to right, " + stops.join(", ") + ")";
    ends.append(
      el("span", { class: "lowered" }, "◀ lowered the score by " + fmt(range.m)),
      el("span", {}, "no effect"),
      el("span", { class: "raised" }, "raised the score by " + fmt(range.m) + " ▶"),
    );
    legend.append(bar, ends, el("p", {}, "Each cell: how much this candidate's score (a click probability) " +
      "would fall if that one behaviour were removed from the user's history. Blue: the behaviour raised the " +
      "score; orange: it lowered it; white: it made no difference. Exact: the model run again without it."));
  }
  legend.append(el("p", { class: "muted" }, "Columns: labelled by category (colour band), numbered by position (0 = newest)." +
    (unlisted ? " Hatched: not listed (past explain_top, or no effect at all)." : "")));
}

function describe(answer, history, catalogue, cells, r, t) {
  const item = answer.items[r];
  const behaviour = history[t];
  const c = cells[r][t];
  let said = "not listed";
  if (c !== null) {
    const effect = c.contribution > 0 ? "raised its score by " + fmt(c.contribution, 6)
      : c.contribution < 0 ? "lowered its score by " + fmt(-c.contribution, 6) : "did not change its score";
    const byEffect = cells[r].filter((x) => x !== null && Math.abs(x.contribution) > Math.abs(c.contribution)).length + 1;
    const byWeight = cells[r].filter((x) => x !== null && x.weight > c.weight).length + 1;
    said = effect + " (#" + byEffect + " by effect for this candidate; contribution " + signed(c.contribution, 6) +
      "); attention weight " + fmt(c.weight, 6) + " (#" + byWeight + " by weight)";
  }
  const box = $("#details");
  box.replaceChildren(
    el("strong", {}, item.item_id), document.createTextNode(" (" + category(catalogue, item.item_id) + "), score " + fmt(item.score) + " — behaviour "),
    el("strong", {}, behaviour === null ? "(not listed)" : behaviour),
    document.createTextNode(" (" + (behaviour === null ? "?" : category(catalogue, behaviour)) + ") at position " + t + " (0 = newest): " + said),
  );
  for (const node of document.querySelectorAll(".selected")) node.classList.remove("selected");
  for (const node of document.querySelectorAll(".cell.pinned")) node.classList.remove("pinned");
  document.querySelectorAll('[data-row="' + r + '"]').forEach((n) => { if (!n.classList.contains("cell")) n.classList.add("selected"); });
  const col = document.querySelector('.col[data-col="' + t + '"]');
  if (col) col.classList.add("selected");
  if (pinned) {
    const cell = document.querySelector('.cell[data-row="' + pinned.row + '"][data-col="' + pinned.col + '"]');
    if (cell) cell.classList.add("pinned");
  }
}

// ------------------------------------------------------------------ wiring

$("#query").addEventListener("submit", rank);
for (const radio of document.querySelectorAll('input[name="view"]')) {
  radio.addEventListener("change", () => {
    view = radio.value;
    if (last) show(last.answer, last.history, last.catalogue);
  });
}
$("#sample").addEventListener("click", sample);
$("#key").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); loadSuggestions(); } });
$("#key").addEventListener("change", loadSuggestions);
loadSuggestions();
