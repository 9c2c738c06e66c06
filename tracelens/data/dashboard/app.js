"use strict";
// Trait Dynamics page. All data comes from the JSON API of tracelens.dashboard; text from files is only ever
// inserted with textContent (token strings are model output).
const $ = (id) => document.getElementById(id);
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];
const SVG = "http://www.w3.org/2000/svg";

function showError(msg) { $("error").textContent = msg || ""; }

async function api(route, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    for (const one of [].concat(v)) q.append(k, one);
  }
  const res = await fetch(`/api/${route}?${q}`);
  let body;
  try { body = await res.json(); } catch (e) { throw new Error(`${route}: HTTP ${res.status}`); }
  if (!res.ok) throw new Error(body.error || `${route}: HTTP ${res.status}`);
  return body;
}

function fill(select, items, label) {
  select.replaceChildren();
  for (const item of items) {
    const opt = document.createElement("option");
    opt.value = typeof item === "object" ? item.id : item;
    opt.textContent = label ? label(item) : String(item);
    select.appendChild(opt);
  }
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

const variant = () => $("variant").value;

async function loadVariant() {
  showError("");
  try {
    fill($("prompt-set"), (await api("prompt-sets", { variant: variant() })).prompt_sets);
    const traits = (await api("traits", { variant: variant(), kind: "projections" })).traits;
    const box = $("traits");
    box.replaceChildren();
    traits.forEach((t, i) => {
      const cb = el("input", { type: "checkbox", value: t, "data-trait": t });
      cb.checked = i === 0;
      cb.addEventListener("change", draw);
      const lab = el("label");
      lab.append(cb, document.createTextNode(" " + t));
      box.appendChild(lab);
    });
    for (const kind of ["extraction", "steering"]) {
      fill($(`${kind}-trait`), (await api("traits", { variant: variant(), kind })).traits);
    }
    await loadPrompts();
    await Promise.all([drawExtraction(), drawSteering()]);
  } catch (e) { showError(e.message); }
}

async function loadPrompts() {
  if (!$("prompt-set").value) { fill($("prompt"), []); return; }
  const prompts = (await api("prompts", { variant: variant(), prompt_set: $("prompt-set").value })).prompts;
  fill($("prompt"), prompts, (p) => `${p.id}: ${p.prompt.slice(0, 60)}`);
  await draw();
}

let drawSeq = 0;  // a slower earlier request must not overwrite a later one

async function draw() {
  const seq = ++drawSeq;
  showError("");
  const clear = () => { $("chart").replaceChildren(); $("legend").replaceChildren(); $("tokens").replaceChildren(); };
  const traits = [...document.querySelectorAll("#traits input:checked")].map((c) => c.value);
  if (!$("prompt").value || traits.length === 0) { clear(); return; }
  let data;
  try {
    data = await api("projections", { variant: variant(), prompt_set: $("prompt-set").value,
      prompt_id: $("prompt").value, trait: traits, clean: $("clean").value });
  } catch (e) { if (seq === drawSeq) { clear(); showError(e.message); } return; }
  if (seq !== drawSeq) return;
  clear();
  const errs = Object.entries(data.errors).map(([t, m]) => `${t}: ${m}`);
  if (errs.length) showError(errs.join("\n"));
  // one line per trait: the first vector of its projection file (usually the best one)
  const lines = Object.entries(data.traits).map(([t, entries]) =>
    ({ trait: t, entry: entries[0], values: entries[0].prompt.concat(entries[0].response) }));
  const n = data.tokens.length, W = 900, H = 300, P = 40;
  const all = lines.flatMap((l) => l.values).concat([0]);
  let lo = Math.min(...all), hi = Math.max(...all);
  if (hi === lo) { hi += 1; lo -= 1; }
  const x = (i) => P + (n > 1 ? (i * (W - 2 * P)) / (n - 1) : 0);
  const y = (v) => H - P - ((v - lo) * (H - 2 * P)) / (hi - lo);
  const svg = svgEl("svg", { width: W, height: H, id: "trajectory", "data-clean": data.clean });
  svg.appendChild(svgEl("line", { x1: P, x2: W - P, y1: y(0), y2: y(0), stroke: "#bbb", "stroke-dasharray": "2,2" }));
  const bx = x(data.prompt_end - 0.5);
  svg.appendChild(svgEl("line", { id: "boundary", x1: bx, x2: bx, y1: P / 2, y2: H - P / 2, stroke: "#555",
    "stroke-dasharray": "4,3" }));
  const note = svgEl("text", { x: bx + 4, y: P / 2 + 10, "font-size": 11, fill: "#555" });
  note.textContent = "response →";
  svg.appendChild(note);
  for (const [v, label] of [[hi, hi.toFixed(2)], [lo, lo.toFixed(2)]]) {
    const t = svgEl("text", { x: 2, y: y(v) + 4, "font-size": 10, fill: "#777" });
    t.textContent = label;
    svg.appendChild(t);
  }
  lines.forEach((l, k) => {
    svg.appendChild(svgEl("polyline", {
      points: l.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
      fill: "none", stroke: COLORS[k % COLORS.length], "stroke-width": 1.5,
      "data-trait": l.trait, "data-values": JSON.stringify(l.values) }));
    const key = el("span", { style: `color:${COLORS[k % COLORS.length]}` },
      `— ${l.trait} (${l.entry.method}, layer ${l.entry.layer}` +
      (l.entry.dims_removed.length ? `, dims ${l.entry.dims_removed.join(",")} removed)` : ")"));
    $("legend").appendChild(key);
  });
  $("chart").appendChild(svg);
  // tokens coloured by the first trait's score: red positive, blue negative
  const first = lines[0];
  if (!first) return;
  const m = Math.max(1e-9, ...first.values.map(Math.abs));
  data.tokens.forEach((tok, i) => {
    const v = first.values[i];
    const span = el("span", { title: `${first.trait}: ${v}`, class: i < data.prompt_end ? "prompt" : "response" }, tok);
    if (i >= data.prompt_end) {
      const a = Math.min(1, Math.abs(v) / m) * 0.6;
      span.style.background = v >= 0 ? `rgba(214,39,40,${a})` : `rgba(31,119,180,${a})`;
    }
    $("tokens").appendChild(span);
  });
}

function heat(v) { return `rgba(44,160,44,${Math.max(0, Math.min(1, (v - 0.5) * 2)) * 0.7})`; }

async function drawExtraction() {
  const box = $("extraction");
  box.replaceChildren();
  if (!$("extraction-trait").value) { box.textContent = "no extraction results for this variant"; return; }
  let data;
  try { data = await api("extraction", { variant: variant(), trait: $("extraction-trait").value }); }
  catch (e) { box.textContent = e.message; return; }
  for (const ev of data.evaluations) {
    box.appendChild(el("div", {}, `${ev.position_dir} / ${ev.component}` +
      (ev.best ? ` — best: ${ev.best.method} layer ${ev.best.layer}` : "")));
    const table = el("table", { class: "extraction" });
    const head = el("tr");
    head.appendChild(el("th", {}, "layer"));
    ev.methods.forEach((m) => head.appendChild(el("th", {}, m)));
    table.appendChild(head);
    for (const layer of ev.layers) {
      const tr = el("tr");
      tr.appendChild(el("th", {}, String(layer)));
      for (const m of ev.methods) {
        const r = ev.results.find((x) => x.method === m && Number(x.layer) === layer);
        const td = el("td", r ? { title: `AUROC ${r.val_auroc}, d ${r.effect_size}, polarity ${r.polarity_correct}` } : {},
          r ? Number(r.val_accuracy).toFixed(3) : "");
        if (r) td.style.background = heat(Number(r.val_accuracy));
        tr.appendChild(td);
      }
      table.appendChild(tr);
    }
    box.appendChild(table);
  }
}

async function drawSteering() {
  const box = $("steering");
  box.replaceChildren();
  if (!$("steering-trait").value) { box.textContent = "no steering results for this variant"; return; }
  let data;
  try { data = await api("steering", { variant: variant(), trait: $("steering-trait").value }); }
  catch (e) { box.textContent = e.message; return; }
  for (const res of data.results) {
    const base = res.baseline ? ` — baseline trait ${res.baseline.trait_mean}, coherence ${res.baseline.coherence_mean}` : "";
    box.appendChild(el("div", {}, `${res.position_dir} (${res.direction})${base}`));
    const table = el("table", { class: "steering" });
    const head = el("tr");
    for (const h of ["layer", "method", "coefficient", "trait", "coherence", "n"]) head.appendChild(el("th", {}, h));
    table.appendChild(head);
    for (const s of res.series) {
      for (const p of s.points) {
        const tr = el("tr");
        for (const v of [s.layer, s.method, p.coefficient, p.trait_mean, p.coherence_mean, p.n]) {
          tr.appendChild(el("td", {}, v === null || v === undefined ? "" : String(v)));
        }
        table.appendChild(tr);
      }
    }
    box.appendChild(table);
  }
}

async function init() {
  try {
    const info = await api("info");
    $("experiment").textContent = info.experiment;
    fill($("variant"), info.variants);
    if (info.default_variant) $("variant").value = info.default_variant;
    $("variant").addEventListener("change", loadVariant);
    $("prompt-set").addEventListener("change", () => loadPrompts().catch((e) => showError(e.message)));
    $("prompt").addEventListener("change", draw);
    $("clean").addEventListener("change", draw);
    $("extraction-trait").addEventListener("change", drawExtraction);
    $("steering-trait").addEventListener("change", drawSteering);
    if (info.variants.length) await loadVariant();
    else showError("this experiment has no inference outputs yet");
  } catch (e) { showError(e.message); }
  document.body.setAttribute("data-ready", "1");
}
init();
