// The Lab's page: plain JavaScript over the JSON endpoints of llama3/lab/api.py, plots by Plotly.
// State the views were drawn from is kept in window.lab (the browser test reads it).
"use strict";

const $ = (id) => document.getElementById(id);
const lab = window.lab = { lang: "en", info: null, conversation: [], answer: null, token: null,
                           walk: null, step: 0, patch: null, last: {} };

// ------------------------------------------------------------------ i18n (words: i18n.js)
const t = (key) => TEXT[lab.lang][key];

function applyLanguage() {
  document.documentElement.lang = lab.lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) {
    if (!el.dataset.en) el.dataset.en = el.textContent;
    const key = el.dataset.i18n;
    el.textContent = lab.lang === "zh" && LABELS.zh[key] ? LABELS.zh[key] : el.dataset.en;
  }
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
    if (el.dataset.enPlaceholder === undefined) el.dataset.enPlaceholder = el.placeholder;
    const key = el.dataset.i18nPlaceholder;
    el.placeholder = lab.lang === "zh" && LABELS.zh[key] ? LABELS.zh[key] : el.dataset.enPlaceholder;
  }
  $("lang").textContent = t("lang_button");
  renderConversation();
  if (lab.token) renderToken();
  if (lab.walk) showStep(lab.step);
  if (lab.patch) $("patch-summary").textContent = t("patch_summary")(lab.patch);
}

// ------------------------------------------------------------------- API
const fmt = (x) => (x == null ? "–" : Math.abs(x) >= 100 || (Math.abs(x) < 1e-3 && x != 0) ? Number(x).toExponential(3) : Number(x).toFixed(4));
let busyCount = 0;
function busy(on) { busyCount += on ? 1 : -1; $("busy").hidden = busyCount <= 0; }
function showError(message) { $("error").textContent = message; $("error").hidden = !message; }

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("llama3-lab-key");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function request(path, body, retry = true) {
  const response = await fetch(path, body === undefined ? { headers: headers() }
                                                      : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (response.status === 401 && retry) {
    const key = window.prompt("API key (llama3 lab --api-key / serve --api-key):");
    if (key) { sessionStorage.setItem("llama3-lab-key", key); return request(path, body, false); }
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function api(path, body) {
  showError("");
  busy(true);
  try {
    const data = await (await request(path, body)).json();
    lab.last[path] = data;
    return data;
  } catch (e) {
    showError(e.message);
    throw e;
  } finally { busy(false); }
}

// ------------------------------------------------------------------- chat
function settings() {
  const seed = $("seed").value;
  return { max_tokens: +$("max-tokens").value, temperature: +$("temperature").value, top_p: +$("top-p").value,
           top_k: +$("top-k").value, ...(seed === "" ? {} : { seed: +seed }) };
}

async function send() {
  const text = $("prompt").value;
  if (!text) return;
  const chat = $("mode").value === "chat" && lab.info && lab.info.chat;
  const body = settings();
  if (chat) {
    lab.conversation.push({ role: "user", content: text });
    body.messages = lab.conversation.map(({ role, content }) => ({ role, content }));
  } else {
    lab.conversation = [{ role: "prompt", content: text }];
    body.prompt = text;
  }
  const answer = { role: "assistant", content: "", prompt_ids: [], tokens: [], settings: null, done: false };
  lab.conversation.push(answer);
  lab.answer = answer;
  $("prompt").value = "";
  renderConversation();
  showError("");
  $("send").disabled = true;
  try {
    const response = await request("/lab/api/generate", body);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).replace(/^data: /, "");
        buffer = buffer.slice(cut + 2);
        if (line === "[DONE]") continue;
        const event = JSON.parse(line);
        if (event.error) { showError(event.error.message); continue; }
        if (event.type === "prompt") { answer.prompt_ids = event.ids; answer.settings = event.settings; }
        else if (event.type === "token") { answer.tokens.push(event); answer.content += event.text; renderConversation(); }
        else if (event.type === "end") { answer.done = true; answer.finish_reason = event.finish_reason; }
      }
    }
  } catch (e) {
    showError(e.message);
  } finally {
    $("send").disabled = false;
    renderConversation();
  }
}

function renderConversation() {
  const box = $("conversation");
  box.textContent = "";
  lab.conversation.forEach((m, mi) => {
    const div = document.createElement("div");
    div.className = "msg";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = m.role === "user" ? t("user") : m.role === "prompt" ? t("prompt_label") : t("assistant");
    div.appendChild(who);
    if (m.tokens) {
      m.tokens.forEach((tok, k) => {
        const span = document.createElement("span");
        span.className = "tok" + (tok.stop ? " stop" : "");
        if (lab.token && lab.token.message === mi && lab.token.index === k) span.classList.add("selected");
        span.textContent = tok.stop ? tok.token : tok.text || tok.token;
        span.dataset.index = k;
        span.onclick = () => clickToken(mi, k);
        div.appendChild(span);
      });
    } else {
      div.appendChild(document.createTextNode(m.content));
    }
    box.appendChild(div);
  });
}

async function clickToken(message, index) {
  const answer = lab.conversation[message];
  const chosen = answer.tokens[index];
  // The context the model had read when it chose token `index`: the prompt and the tokens before it.
  const ids = answer.prompt_ids.concat(answer.tokens.slice(0, index).map((x) => x.id));
  const views = await api("/lab/api/token", { ids });
  lab.token = { message, index, chosen, settings: answer.settings, views, ids };
  renderConversation();
  renderToken();
}

function renderToken() {
  const { chosen, settings: s, views } = lab.token;
  $("token-panel").hidden = false;
  $("token-chosen").textContent = chosen.token;
  $("token-read").textContent = views.tokens[views.tokens.length - 1];
  $("sampling").textContent = t("sampling")(s) + " · " + t("chosen_rank")(chosen);
  const body = $("candidates").tBodies[0];
  body.textContent = "";
  for (const c of chosen.candidates) {
    const tr = body.insertRow();
    if (c.id === chosen.id) tr.className = "selected";
    tr.insertCell().textContent = c.token;
    tr.insertCell().textContent = c.id;
    Object.assign(tr.insertCell(), { className: "num", textContent: fmt(c.prob) });
    Object.assign(tr.insertCell(), { className: "num", textContent: fmt(c.sampled_prob) });
  }
  const layers = views.attention.length;
  const select = $("attn-layer");
  if (select.options.length !== layers) {
    select.textContent = "";
    for (let l = 0; l < layers; l++) select.add(new Option(String(l), String(l)));
    select.value = String(layers - 1);
  }
  drawAttention();
  drawLens();
  drawResidual();
}

function groupedRows(weights, nRep) {
  // heads h of kv group g = h / nRep, with an empty row between groups so the groups stand apart
  const z = [], y = [];
  weights.forEach((row, h) => {
    if (h > 0 && h % nRep === 0) { z.push(row.map(() => null)); y.push(" ".repeat(h / nRep)); }
    z.push(row);
    y.push(`${t("head")} ${h} (${t("kv")} ${Math.floor(h / nRep)})`);
  });
  return { z, y };
}

// a plot's height in pixels: room for every row's label (at least 300)
const tall = (rows, perRow) => Math.max(300, rows * perRow + 140);

function tokenAxis(tokens) {
  return { tickmode: "array", tickvals: tokens.map((_, i) => i), ticktext: tokens.map((x, i) => `${i}:${x}`) };
}

function drawAttention() {
  const { views } = lab.token;
  const layer = +$("attn-layer").value;
  const { z, y } = groupedRows(views.attention[layer], views.n_rep);
  Plotly.react("attn-plot", [{ type: "heatmap", z, y, x: views.tokens.map((_, i) => i), colorscale: "Viridis",
                               zmin: 0, zmax: 1, hoverongaps: false }],
               { margin: { l: 120, t: 10, b: 90 }, height: tall(z.length, 22), xaxis: tokenAxis(views.tokens),
                 yaxis: { autorange: "reversed", dtick: 1 } },
               { responsive: true });
  const sink = views.attention.map((heads) => heads.map((row) => row[0]));
  Plotly.react("sink-plot", [{ type: "heatmap", z: sink, colorscale: "Viridis", zmin: 0, zmax: 1 }],
               { title: { text: t("sink"), font: { size: 12 } }, margin: { t: 30 }, height: tall(sink.length, 14),
                 xaxis: { title: { text: t("head") }, dtick: 1 }, yaxis: { title: { text: "layer" }, dtick: 1 } }, { responsive: true });
}

function drawLens() {
  const lens = lab.token.views.lens;
  Plotly.react("lens-plot", [{ type: "bar", orientation: "h", y: lens.map((r) => r.layer), x: lens.map((r) => r.top[0].prob),
                               text: lens.map((r) => r.top[0].token), textposition: "auto" }],
               { margin: { l: 80, t: 10 }, height: tall(lens.length, 16), yaxis: { dtick: 1 },
                 xaxis: { range: [0, 1], title: { text: "p" } } }, { responsive: true });
  const body = $("lens-table").tBodies[0];
  body.textContent = "";
  for (const r of lens) {
    const tr = body.insertRow();
    tr.insertCell().textContent = r.layer;
    tr.insertCell().textContent = r.top.map((c) => `${c.token} ${fmt(c.prob)}`).join("  ");
  }
}

function drawResidual() {
  const r = lab.token.views.residual;
  const blocks = r.attention_adds.map((_, i) => i);
  Plotly.react("resid-plot", [
    { type: "scatter", mode: "lines+markers", name: t("stream"), x: blocks, y: r.stream.slice(0, -1) },
    { type: "scatter", mode: "lines+markers", name: t("attn_adds"), x: blocks, y: r.attention_adds },
    { type: "scatter", mode: "lines+markers", name: t("ffn_adds"), x: blocks, y: r.ffn_adds },
  ], { margin: { t: 10 }, yaxis: { type: "log", title: { text: "‖·‖₂" } }, xaxis: { title: { text: "block" } } },
  { responsive: true });
}

// ------------------------------------------------------------------- walk
async function runWalk() {
  lab.walk = await api("/lab/api/walk", { prompt: $("walk-prompt").value, layer: +$("walk-layer").value });
  const list = $("walk-steps");
  list.textContent = "";
  lab.walk.steps.forEach((s, i) => {
    const li = document.createElement("li");
    li.textContent = s.name;
    li.style.marginLeft = `${s.depth}em`;
    li.onclick = () => showStep(i);
    list.appendChild(li);
  });
  $("walk-detail").hidden = false;
  showStep(0);
}

function escapeHtml(s) { return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }

function markdown(text) {
  // enough Markdown for the walkthrough: paragraphs, lists, tables and code blocks as preformatted text,
  // **bold**, `code`, [links] as their text
  const inline = (s) => escapeHtml(s).replace(/`([^`]+)`/g, "<code>$1</code>").replace(/\*\*([^*]+)\*\*/g, "<b>$1</b>")
    .replace(/!\[[^\]]*\]\([^)]*\)/g, "").replace(/\[([^\]]+)\]\([^)]*\)/g, "$1");
  return text.split(/\n\s*\n/).map((block) => {
    if (/^(\||```|    )/.test(block)) return `<pre>${escapeHtml(block.replace(/^```.*$/gm, ""))}</pre>`;
    if (/^#+ /.test(block)) return `<h4>${inline(block.replace(/^#+ /, ""))}</h4>`;
    return `<p>${inline(block)}</p>`;
  }).join("");
}

function showStep(i) {
  const steps = lab.walk.steps;
  if (!steps.length) return;
  lab.step = Math.max(0, Math.min(steps.length - 1, i));
  const s = steps[lab.step];
  [...$("walk-steps").children].forEach((li, k) => li.classList.toggle("selected", k === lab.step));
  $("walk-name").textContent = s.name;
  $("walk-shape").textContent = s.shape || "";
  $("walk-stats").textContent = s.stats ? `mean ${fmt(s.stats.mean)} · std ${fmt(s.stats.std)} · min ${fmt(s.stats.min)} · max ${fmt(s.stats.max)}` : "";
  $("walk-note").textContent = s.note || "";
  if (s.heatmap) {
    Plotly.react("walk-plot", [{ type: "heatmap", z: s.heatmap, colorscale: "RdBu", reversescale: true, hoverongaps: false }],
                 { margin: { t: 10 }, yaxis: { autorange: "reversed" } }, { responsive: true });
  } else { Plotly.purge("walk-plot"); }
  const code = $("walk-code");
  code.innerHTML = s.code ? s.code.lines.map((line, k) => {
    const n = s.code.start + k;
    const html = `${String(n).padStart(4)}  ${escapeHtml(line)}`;
    return n === s.code.focus ? `<span class="focus">${html}</span>` : html;
  }).join("\n") + `\n\n  ${s.code.file}: ${s.code.function}` : "";
  const text = s.text ? s.text[lab.lang] : null;
  $("walk-text-title").textContent = text ? text.title : "";
  $("walk-text").innerHTML = text ? markdown(text.text) : "";
}

// ------------------------------------------------------------ experiments
async function runPatch() {
  const body = { clean: $("patch-clean").value, corrupted: $("patch-corrupted").value, site: $("patch-site").value };
  if ($("patch-answer").value) body.answer = $("patch-answer").value;
  if ($("patch-wrong").value) body.wrong = $("patch-wrong").value;
  const r = lab.patch = await api("/lab/api/patch", body);
  $("patch-summary").textContent = t("patch_summary")(r);
  Plotly.react("patch-plot", [{ type: "heatmap", z: r.restored, y: r.rows, x: r.columns, colorscale: "RdBu",
                                zmid: 0, zmin: -1, zmax: 1 }],
               { margin: { l: 80, b: 100, t: 10 }, height: tall(r.rows.length, 16) }, { responsive: true });
  $("patch-plot").removeAllListeners("plotly_click");
  $("patch-plot").on("plotly_click", (event) => openHead(event.points[0]));
}

async function openHead(point) {
  const r = lab.patch;
  const layer = r.rows.indexOf(point.y);
  const column = r.columns.indexOf(point.x);
  const data = await api("/lab/api/head", { prompt: $("patch-clean").value, layer: Number(r.rows[layer].split(" ")[1]) });
  let z, y, title;
  if (r.site === "heads") {
    z = data.weights[column];
    y = data.tokens.map((x, i) => `${i}:${x}`);
    title = t("head_title")(data.layer, column);
  } else {       // the attention row of the patched position, every head of that layer
    ({ z, y } = groupedRows(data.weights.map((w) => w[column]), data.n_rep));
    title = t("head_title")(data.layer, null) + ` · ${data.tokens[column]}`;
  }
  lab.head = { layer: data.layer, column, z };
  Plotly.react("head-plot", [{ type: "heatmap", z, y, x: data.tokens.map((_, i) => i), colorscale: "Viridis", zmin: 0, zmax: 1 }],
               { title: { text: title, font: { size: 12 } }, margin: { l: 120, b: 90 }, height: tall(z.length, 22),
                 xaxis: tokenAxis(data.tokens), yaxis: { autorange: "reversed", dtick: 1 } }, { responsive: true });
}

async function runAttribution(context) {
  const body = { method: $("attr-method").value, steps: +$("attr-steps").value };
  if (context) { body.ids = context.ids; body.target = context.target; }     // from a clicked chat token
  else {
    body.prompt = $("attr-prompt").value;
    if ($("attr-target").value) body.target = $("attr-target").value;
  }
  const r = lab.attribution = await api("/lab/api/attribute", body);
  $("attr-summary").textContent = t("attr_summary")(r);
  Plotly.react("attr-plot", [{ type: "bar", x: r.tokens.map((x, i) => `${i}:${x}`), y: r.scores,
                               marker: { color: r.scores.map((v) => (v > 0 ? "#d62728" : "#1f77b4")) } }],
               { margin: { t: 10, b: 90 } }, { responsive: true });
}

const numbers = (text) => text.split(/[\s,]+/).filter(Boolean);

async function runAblation() {
  const heads = numbers($("abl-heads").value).map((x) => x.split(".").map(Number));
  const blocks = numbers($("abl-blocks").value).map(Number);
  const r = lab.ablation = await api("/lab/api/ablate", { prompt: $("abl-prompt").value, heads, blocks });
  const body = $("abl-table").tBodies[0];
  body.textContent = "";
  r.before.forEach((b, k) => {
    const a = r.after[k];
    const tr = body.insertRow();
    tr.insertCell().textContent = b.token;
    Object.assign(tr.insertCell(), { className: "num", textContent: fmt(b.prob) });
    tr.insertCell().textContent = a.token;
    Object.assign(tr.insertCell(), { className: "num", textContent: fmt(a.prob) });
  });
}

async function runFidelity() {
  const r = lab.fidelity = await api("/lab/api/fidelity", { prompt: $("fid-prompt").value });
  $("fid-summary").textContent = t("fid_summary")(r);
  const body = $("fid-table").tBodies[0];
  body.textContent = "";
  for (const s of r.stages) {
    const tr = body.insertRow();
    tr.insertCell().textContent = s.stage;
    for (const v of [s.max_abs_diff.toExponential(2), s.relative.toExponential(2), s.cosine.toFixed(8)])
      Object.assign(tr.insertCell(), { className: "num", textContent: v });
  }
}

// ------------------------------------------------------------------ start
function showTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== `tab-${name}`;
}

async function start() {
  for (const b of document.querySelectorAll(".tab")) b.onclick = () => showTab(b.dataset.tab);
  $("lang").onclick = () => { lab.lang = lab.lang === "en" ? "zh" : "en"; applyLanguage(); };
  $("send").onclick = send;
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
  $("reset").onclick = () => { lab.conversation = []; lab.token = null; $("token-panel").hidden = true; renderConversation(); };
  $("attn-layer").onchange = drawAttention;
  $("walk-run").onclick = runWalk;
  $("walk-prev").onclick = () => showStep(lab.step - 1);
  $("walk-next").onclick = () => showStep(lab.step + 1);
  $("patch-run").onclick = runPatch;
  $("attr-run").onclick = () => runAttribution();
  $("token-attribute").onclick = () => {
    showTab("experiments");
    $("attr-target").value = `#${lab.token.chosen.id}`;
    runAttribution({ ids: lab.token.ids, target: `#${lab.token.chosen.id}` });
  };
  $("abl-run").onclick = runAblation;
  $("fid-run").onclick = runFidelity;
  applyLanguage();
  try {
    lab.info = await api("/lab/api/info");
    const i = lab.info;
    $("model-info").textContent = `${i.name}: ${i.n_layers} blocks, ${i.n_heads} heads / ${i.n_kv_heads} kv, D=${i.dim}, V=${i.vocab_size}, ${i.dtype}`;
    if (!i.chat) $("mode").value = "completion";
    $("fid-run").disabled = !i.fidelity;
  } catch (e) { /* shown */ }
  lab.ready = true;
}

start();
