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

const fmt = (v, d = 4) => (v === null || v === undefined ? "" : Number(v).toFixed(d));
const fmtCI = (e, d = 4) => (e ? `${fmt(e.value, d)} [${fmt(e.lo, d)}, ${fmt(e.hi, d)}]` : "");

function svgText(svg, x, y, str, attrs) {
  const t = svgEl("text", { x, y, "font-size": 10, fill: "#555", ...attrs });
  t.textContent = str;
  svg.appendChild(t);
  return t;
}

// A framed plot: x(v) and y(v) map data to pixels; ticks at the given values, labelled with `tick`.
function plot(cls, attrs, xr, yr, labels, ticks) {
  const W = 460, H = 270, L = 56, R = 16, T = 14, B = 42;
  const widen = ([lo, hi]) => (hi > lo ? [lo, hi] : [lo - 1, hi + 1]);
  const [x0, x1] = widen(xr), [y0, y1] = widen(yr);
  const x = (v) => L + ((v - x0) * (W - L - R)) / (x1 - x0);
  const y = (v) => H - B - ((v - y0) * (H - T - B)) / (y1 - y0);
  const svg = svgEl("svg", { width: W, height: H, class: cls, ...attrs });
  svg.appendChild(svgEl("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#ccc" }));
  for (const v of ticks.x) svgText(svg, x(v), H - B + 14, ticks.fmt.x(v), { "text-anchor": "middle" });
  for (const v of ticks.y) svgText(svg, L - 4, y(v) + 3, ticks.fmt.y(v), { "text-anchor": "end" });
  svgText(svg, (L + W - R) / 2, H - 6, labels.x, { "text-anchor": "middle" });
  const my = (T + H - B) / 2;
  svgText(svg, 12, my, labels.y, { "text-anchor": "middle", transform: `rotate(-90 12 ${my})` });
  return { svg, x, y, x0, x1, y0, y1 };
}

function title(node, text) {
  const t = svgEl("title");
  t.textContent = text;
  node.appendChild(t);
  return node;
}

// Test AUROC by layer for one method: the chance band (grey), the 95% interval (shaded) and the value (line);
// filled points are above chance, the dashed line marks the selected layer.
function aurocChart(ev, method, color) {
  const rows = ev.results.filter((r) => r.method === method).sort((a, b) => a.layer - b.layer);
  const layers = rows.map((r) => Number(r.layer));
  const band = (l) => ev.chance.layers[String(l)].auroc;
  const step = Math.max(1, Math.ceil(layers.length / 12));
  const p = plot("auroc-chart", { "data-method": method, "data-position": ev.position_dir, "data-component": ev.component },
    [Math.min(...layers), Math.max(...layers)], [0, 1], { x: "layer", y: `${method}: test AUROC` },
    { x: layers.filter((_, i) => i % step === 0), y: [0, 0.5, 1], fmt: { x: String, y: (v) => v.toFixed(1) } });
  const area = (lo, hi) => layers.map((l, i) => `${p.x(l).toFixed(1)},${p.y(lo(l, i)).toFixed(1)}`)
    .concat(layers.map((l, i) => [l, i]).reverse().map(([l, i]) => `${p.x(l).toFixed(1)},${p.y(hi(l, i)).toFixed(1)}`))
    .join(" ");
  p.svg.appendChild(title(svgEl("polygon", { class: "chance", points: area((l) => band(l).lo, (l) => band(l).hi),
    fill: "#bbb", "fill-opacity": 0.5, "data-layers": JSON.stringify(layers),
    "data-lo": JSON.stringify(layers.map((l) => band(l).lo)), "data-hi": JSON.stringify(layers.map((l) => band(l).hi)) }),
  `chance: ${ev.chance.percentiles.join("-")}th percentile of ${ev.chance.n_directions} random directions`));
  p.svg.appendChild(svgEl("polygon", { class: "interval", fill: color, "fill-opacity": 0.18,
    points: area((l, i) => rows[i].test.auroc.lo, (l, i) => rows[i].test.auroc.hi) }));
  p.svg.appendChild(svgEl("line", { x1: p.x(p.x0), x2: p.x(p.x1), y1: p.y(0.5), y2: p.y(0.5), stroke: "#999",
    "stroke-dasharray": "2,2" }));
  p.svg.appendChild(svgEl("polyline", { class: "auroc", fill: "none", stroke: color, "stroke-width": 1.5,
    points: rows.map((r) => `${p.x(r.layer).toFixed(1)},${p.y(r.test.auroc.value).toFixed(1)}`).join(" ") }));
  for (const r of rows) {
    const a = r.test.auroc, b = band(r.layer);
    p.svg.appendChild(title(svgEl("circle", { class: "point", cx: p.x(r.layer), cy: p.y(a.value), r: 3.5, stroke: color,
      fill: r.above_chance ? color : "#fff", "data-layer": r.layer, "data-auroc": a.value, "data-lo": a.lo, "data-hi": a.hi,
      "data-chance-lo": b.lo, "data-chance-hi": b.hi, "data-above-chance": String(r.above_chance) }),
    `layer ${r.layer}: test AUROC ${fmtCI(a)}, chance [${fmt(b.lo)}, ${fmt(b.hi)}]`));
  }
  if (ev.selected.method === method) {
    const sx = p.x(Number(ev.selected.layer));
    p.svg.appendChild(svgEl("line", { class: "selected", x1: sx, x2: sx, y1: p.y(1), y2: p.y(0), stroke: "#333",
      "stroke-dasharray": "5,3", "data-layer": ev.selected.layer }));
    const left = sx > p.x((p.x0 + p.x1) / 2);  // keep the label inside the frame
    svgText(p.svg, left ? sx - 3 : sx + 3, p.y(1) + 10, "selected", { fill: "#333", "text-anchor": left ? "end" : "start" });
  }
  return p.svg;
}

function table(cls, header, rows) {
  const t = el("table", { class: cls });
  const head = el("tr");
  for (const h of header) head.appendChild(el("th", {}, h));
  t.appendChild(head);
  for (const row of rows) {
    const tr = el("tr");
    for (const v of row) tr.appendChild(el("td", {}, v === null || v === undefined ? "" : String(v)));
    t.appendChild(tr);
  }
  return t;
}

async function drawExtraction() {
  const box = $("extraction");
  box.replaceChildren();
  if (!$("extraction-trait").value) { box.textContent = "no extraction results for this variant"; return; }
  let data;
  try { data = await api("extraction", { variant: variant(), trait: $("extraction-trait").value }); }
  catch (e) { box.textContent = e.message; return; }
  for (const ev of data.evaluations) {
    const s = ev.splits, sel = ev.selected;
    box.appendChild(el("div", {}, `${ev.position} / ${ev.component} — pairs: train ${s.train}, select ${s.select}, ` +
      `test ${s.test} — selected: ${sel.method} layer ${sel.layer} (by ${sel.by}, of ${ev.layers.length} layers)`));
    const charts = el("div", { class: "charts" });
    ev.methods.forEach((m, k) => charts.appendChild(aurocChart(ev, m, COLORS[k % COLORS.length])));
    box.appendChild(charts);
    box.appendChild(el("div", { class: "note" }, `grey: chance band (${ev.chance.percentiles.join("-")}th percentile ` +
      `of ${ev.chance.n_directions} random directions); shaded: 95% interval over test questions; filled point: above chance`));
    const rows = [...ev.results].sort((a, b) => a.method.localeCompare(b.method) || a.layer - b.layer).map((r) => {
      const b = ev.chance.layers[String(r.layer)].auroc;
      return [r.method, r.layer, fmtCI(r.test.auroc), fmtCI(r.test.accuracy), `[${fmt(b.lo)}, ${fmt(b.hi)}]`,
        fmt(r.select.auroc), r.above_chance ? "yes" : "no",
        r.method === sel.method && Number(r.layer) === Number(sel.layer) ? "selected" : ""];
    });
    box.appendChild(table("extraction", ["method", "layer", "test AUROC [95% CI]", "test accuracy [95% CI]",
      "chance AUROC", "select AUROC", "above chance", ""], rows));
  }
}

// The trade-off figure (trait against KL, controls, budget) as the server renders it for the report too.
function tradeoffFigure(res) {
  const doc = new DOMParser().parseFromString(res.tradeoff_svg, "image/svg+xml");
  return document.importNode(doc.documentElement, true);
}

async function drawSteering() {
  const box = $("steering");
  box.replaceChildren();
  if (!$("steering-trait").value) { box.textContent = "no steering results for this variant"; return; }
  let data;
  try { data = await api("steering", { variant: variant(), trait: $("steering-trait").value }); }
  catch (e) { box.textContent = e.message; return; }
  for (const res of data.results) {
    const judge = res.judge || {}, validity = judge.validity;
    box.appendChild(el("div", {}, `${res.position_dir} (${res.direction}) — judge ${judge.model || "?"}, validity ` +
      (validity ? `AUROC ${fmtCI(validity.auroc)} on ${validity.n_pairs} pairs` : "not measured")));
    if (res.baseline) {
      const jf = res.baseline_judge_free || {};
      box.appendChild(el("div", {}, `baseline: judge trait ${fmt(res.baseline.trait_mean, 1)}, coherence ` +
        `${fmt(res.baseline.coherence_mean, 1)}; log-likelihood ratio ${fmtCI(jf.llr)}, NLL ${fmtCI(jf.nll)} nats/token`));
    }
    if (res.tradeoff_svg) box.appendChild(tradeoffFigure(res));
    const sel = res.selection || {};
    box.appendChild(el("div", { class: "note" }, sel.max_kl === undefined ? "selection rule not recorded" :
      `selected: highest judge trait with KL <= ${sel.max_kl} nats/token and judge coherence >= ${sel.min_coherence}; ` +
      `runs over the budget are shown, never selected`));
    const rows = res.runs.map((r) => {
      const jf = r.judge_free || {};
      return [r.layer, r.method, r.coefficient, fmt(r.trait_mean, 1), fmt(r.coherence_mean, 1), fmtCI(jf.trait_effect),
        fmtCI(jf.nll_cost), fmtCI(jf.kl), r.within_budget === null ? "" : (r.within_budget ? "yes" : "over"),
        r.selected ? "selected" : ""];
    });
    box.appendChild(table("steering", ["layer", "method", "coefficient", "judge trait", "judge coherence",
      "trait effect", "NLL cost", "KL", "within budget", ""], rows));
    const rep = res.report;
    const td = rep ? rep.trait_delta : {};
    box.appendChild(el("div", { class: "report" }, rep
      ? `report (selected run on ${rep.n_questions} unseen questions): trait delta steered ` +
        `${fmtCI(td.steered, 1)}, prompted ${fmtCI(td.prompted, 1)}, random controls ${fmtCI(td.control, 1)}; ` +
        `coherence steered ${fmtCI(rep.coherence.steered, 1)}, control ${fmtCI(rep.coherence.control, 1)}`
      : "no report line: no run is within the KL budget with enough coherence, or the search has not finished"));
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
