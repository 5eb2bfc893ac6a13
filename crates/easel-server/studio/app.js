// easel studio: a client of easel's public API (see the README), written without a build step.
// Jobs go through POST /v1/jobs; their progress and step previews come from the job's SSE
// stream, read with fetch() so the API key can travel in a header (EventSource cannot send one).

const $ = (id) => document.getElementById(id);
const state = { models: [], closed: [], loras: [], lastSeed: null, job: null, galleryBefore: null, byId: new Map() };

function headers(json) {
  const h = {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function showError(message) {
  const e = $("error");
  e.textContent = message;
  e.hidden = !message;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: { ...headers(options.body !== undefined), ...(options.headers || {}) } });
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    const message = body && body.error ? body.error.message : `${r.status} ${r.statusText}`;
    if (r.status === 401) $("api-key").focus();
    throw new Error(message);
  }
  return body;
}

// ---- Generate ----------------------------------------------------------------------------

const RATIOS = [["1:1", 1, 1], ["3:2", 3, 2], ["2:3", 2, 3], ["16:9", 16, 9], ["9:16", 9, 16]];

function currentModel() {
  return state.models.find((m) => m.id === $("model").value);
}

function fillSizes() {
  const m = currentModel();
  $("size").innerHTML = "";
  // Routed and closed models: the size is the serving model's own unless chosen by hand.
  if (!m) $("size").add(new Option("model default", "default"));
  const side = m ? m.default_size : 1024;
  const grid = m ? m.size_multiple || 8 : 16;
  for (const [name, a, b] of RATIOS) {
    const w = Math.max(grid, Math.round((side * Math.sqrt(a / b)) / grid) * grid);
    const h = Math.max(grid, Math.round((side * Math.sqrt(b / a)) / grid) * grid);
    $("size").add(new Option(`${name} (${w}x${h})`, `${w}x${h}`));
  }
  $("size").add(new Option("custom (Advanced)", "custom"));
  $("scheduler").innerHTML = "";
  $("scheduler").add(new Option("model default", ""));
  for (const s of (m && m.schedulers) || []) $("scheduler").add(new Option(s, s));
  if (m) {
    $("steps").placeholder = m.default_steps;
    $("guidance").placeholder = m.default_guidance;
  }
}

async function loadModels() {
  const [models, loras, cost] = await Promise.all([api("/v1/models"), api("/v1/loras"), api("/v1/cost")]);
  state.models = models.data.map((m) => m.easel);
  state.closed = cost.closed;
  state.cost = cost;
  $("model").innerHTML = "";
  for (const m of state.models) $("model").add(new Option(`${m.id} — local`, m.id));
  for (const c of cost.closed) {
    const id = `${c.provider}:${c.model}`;
    if ([...$("model").options].some((o) => o.value === id)) continue;
    $("model").add(new Option(`${id} — closed, $${c.usd_per_image.toFixed(3)}/image`, id));
    if (![...$("route").options].some((o) => o.value === c.provider)) $("route").add(new Option(c.provider, c.provider));
  }
  for (const a of cost.aliases) $("model").add(new Option(`${a} — routed`, a));
  for (const t of cost.tiers) $("model").add(new Option(`tier ${t} — routed`, `tier:${t}`));
  $("lora-name").innerHTML = "";
  for (const l of loras.data) $("lora-name").add(new Option(l.name, l.name));
  fillSizes();
}

function addLora(name, scale) {
  if (!name) return;
  const li = document.createElement("li");
  li.dataset.name = name;
  li.dataset.scale = scale;
  li.textContent = `${name} × ${scale} `;
  const x = document.createElement("button");
  x.type = "button";
  x.textContent = "remove";
  x.onclick = () => li.remove();
  li.append(x);
  $("loras").append(li);
}

function request() {
  const body = { prompt: $("prompt").value, n: Number($("n").value) || 1, preview_every: 1 };
  const model = $("model").value;
  if (model.startsWith("tier:")) body.tier = model.slice(5);
  else body.model = model;
  const size = $("size").value;
  if (size === "custom") {
    if ($("width").value && $("height").value) body.size = `${$("width").value}x${$("height").value}`;
  } else if (size !== "default") body.size = size;
  if ($("negative").value.trim()) body.negative_prompt = $("negative").value;
  if ($("steps").value) body.steps = Number($("steps").value);
  if ($("guidance").value) body.guidance_scale = Number($("guidance").value);
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  if (!$("random-seed").checked && $("seed").value !== "") body.seed = Number($("seed").value);
  if ($("private").checked) body.privacy = "private";
  if ($("route").value !== "auto") body.route = $("route").value;
  const loras = [...$("loras").children].map((li) => ({ name: li.dataset.name, scale: Number(li.dataset.scale) }));
  if (loras.length) body.loras = loras;
  return body;
}

// Reads an SSE response body, calling onEvent(name, data) for each event.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      let data = "";
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data && onEvent(name, JSON.parse(data)) === false) return reader.cancel();
    }
  }
}

async function generate(event) {
  if (event) event.preventDefault();
  showError("");
  if (!$("prompt").value.trim()) return $("prompt").focus();
  $("go").disabled = true;
  try {
    const job = await api("/v1/jobs", { method: "POST", body: JSON.stringify(request()) });
    state.job = job.id;
    state.lastSeed = job.easel.seeds[0];
    $("result").innerHTML = "";
    $("live").hidden = false;
    $("preview").hidden = true;
    $("bar").style.width = "0%";
    $("status").textContent = job.status === "queued" ? `queued (position ${job.queue_position ?? 0})` : job.status;
    if (job.status === "succeeded") return showResult(job);
    const r = await fetch(`/v1/jobs/${job.id}/events`, { headers: headers(false) });
    if (!r.ok) throw new Error(`events: ${r.status}`);
    await readEvents(r, (name, e) => {
      if (name === "queued") $("status").textContent = `queued (position ${e.position})`;
      if (name === "started") $("status").textContent = "running";
      if (name === "progress") {
        $("bar").style.width = `${(100 * e.step) / e.total}%`;
        $("status").textContent = `step ${e.step} of ${e.total}`;
      }
      if (name === "preview") {
        $("preview").src = e.image;
        $("preview").hidden = false;
      }
      if (name === "failed") showError(`failed: ${e.reason}`);
      if (name === "canceled") $("status").textContent = "canceled";
      return !["completed", "failed", "canceled"].includes(name);
    });
    const done = await api(`/v1/jobs/${job.id}`);
    if (done.status === "succeeded") showResult(done);
  } catch (e) {
    showError(e.message);
  } finally {
    $("go").disabled = false;
  }
}

function showResult(job) {
  $("status").textContent = `done: seed ${job.easel.seeds.join(", ")}, ${job.easel.provider}, $${(job.easel.cost_usd ?? 0).toFixed(5)}`;
  $("bar").style.width = "100%";
  $("preview").hidden = true;
  $("result").innerHTML = "";
  for (const img of job.images || []) {
    const el = document.createElement("img");
    el.src = img.url;
    el.alt = job.request.prompt;
    el.className = "final";
    $("result").append(el);
  }
}

async function cancelCurrent() {
  if (state.job) await api(`/v1/jobs/${state.job}/cancel`, { method: "POST" }).catch((e) => showError(e.message));
}

// ---- Queue ---------------------------------------------------------------------------------

async function refreshQueue() {
  const list = await api("/v1/jobs?limit=100");
  const rows = list.data.filter((j) => j.status === "queued" || j.status === "running");
  $("queue").innerHTML = "";
  for (const j of rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = j.id;
    for (const text of [j.id, j.status, j.queue_position ?? "", j.request.prompt]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    const td = document.createElement("td");
    const b = document.createElement("button");
    b.textContent = "Cancel";
    b.className = "cancel-job";
    b.onclick = () => api(`/v1/jobs/${j.id}/cancel`, { method: "POST" }).then(refreshQueue, (e) => showError(e.message));
    td.append(b);
    tr.append(td);
    $("queue").append(tr);
  }
}

// ---- Gallery -------------------------------------------------------------------------------

async function loadGallery(reset) {
  if (reset) {
    state.galleryBefore = null;
    $("grid").innerHTML = "";
  }
  const q = state.galleryBefore ? `&before=${state.galleryBefore}` : "";
  const page = await api(`/v1/jobs?limit=24${q}`);
  for (const j of page.data) {
    state.byId.set(j.id, j);
    for (const img of j.status === "succeeded" ? j.images || [] : []) {
      const el = document.createElement("img");
      el.src = img.url;
      el.alt = j.request.prompt;
      el.dataset.job = j.id;
      el.tabIndex = 0;
      el.setAttribute("role", "button");
      el.onclick = () => openDetail(j, img);
      el.onkeydown = (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          openDetail(j, img);
        }
      };
      $("grid").append(el);
    }
  }
  state.galleryBefore = page.last_id;
  $("more").hidden = !page.has_more;
}

function openDetail(job, img) {
  $("detail-image").src = img.url;
  $("detail-params").textContent = JSON.stringify({ ...job.request, seed: img.seed }, null, 2);
  $("download").href = img.url;
  $("download").download = `${job.id}-${img.seed}.${job.request.output_format || "png"}`;
  $("use-params").onclick = () => useParams(job, img, false);
  $("same-seed").onclick = () => useParams(job, img, true);
  $("detail").showModal();
}

function useParams(job, img, focusPrompt) {
  const r = job.request;
  $("prompt").value = r.prompt;
  $("negative").value = r.negative_prompt || "";
  if ([...$("model").options].some((o) => o.value === r.model)) $("model").value = r.model;
  fillSizes();
  $("size").value = "custom";
  $("width").value = r.width;
  $("height").value = r.height;
  $("steps").value = r.steps;
  $("guidance").value = r.guidance;
  $("scheduler").value = r.scheduler || "";
  // The batch's seed and size: image i of an n-image job is reproduced by the same n.
  $("seed").value = img.seed;
  $("random-seed").checked = false;
  $("n").value = r.n || 1;
  $("private").checked = Boolean(r.private);
  $("loras").innerHTML = "";
  for (const l of r.loras || []) addLora(l.name, l.scale);
  $("advanced").open = true;
  $("detail").close();
  switchTab("generate");
  if (focusPrompt) $("prompt").select();
}

// ---- Cost ----------------------------------------------------------------------------------

function usd(x) {
  return `$${x.toFixed(x < 0.01 ? 5 : x < 1 ? 3 : 2)}`;
}

async function loadCost() {
  const today = new Date().toISOString().slice(0, 10);
  const month = `${today.slice(0, 7)}-01`;
  const [usage, cost] = await Promise.all([api(`/v1/usage?since=${month}`), api("/v1/cost")]);
  const rows = usage.data;
  const sum = (f) => rows.filter(f).reduce((a, r) => a + r.cost_usd, 0);
  $("spend-today").textContent = usd(sum((r) => r.day === today));
  $("spend-month").textContent = usd(sum(() => true));
  const local = rows.filter((r) => r.provider === "local");
  const closed = rows.filter((r) => r.provider !== "local");
  const per = (rs) => {
    const images = rs.reduce((a, r) => a + r.images, 0);
    return images ? rs.reduce((a, r) => a + r.cost_usd, 0) / images : null;
  };
  const localPer = per(local);
  const closedPer = per(closed) ?? (cost.closed.length ? Math.min(...cost.closed.map((c) => c.usd_per_image)) : null);
  $("local-per-image").textContent = localPer === null ? "no local images yet" : usd(localPer);
  $("closed-per-image").textContent = closedPer === null ? "no closed provider" : usd(closedPer);
  $("usage").innerHTML = "";
  const byKey = new Map();
  for (const r of rows) {
    const k = `${r.provider}|${r.model}|${r.api_key ?? ""}`;
    const acc = byKey.get(k) || { ...r, images: 0, cost_usd: 0 };
    acc.images += r.images;
    acc.cost_usd += r.cost_usd;
    byKey.set(k, acc);
  }
  for (const r of byKey.values()) {
    const tr = document.createElement("tr");
    for (const t of [r.provider, r.model, r.api_key ?? "", r.images, usd(r.cost_usd)]) {
      const td = document.createElement("td");
      td.textContent = t;
      tr.append(td);
    }
    $("usage").append(tr);
  }
  $("health").innerHTML = "";
  for (const h of cost.providers) {
    const tr = document.createElement("tr");
    const circuit = h.circuit_open ? "open (skipped)" : "closed";
    const latency = h.latency_s === null ? "" : `${h.latency_s.toFixed(1)} s`;
    for (const t of [h.provider, circuit, h.consecutive_failures, latency, h.last_error ?? ""]) {
      const td = document.createElement("td");
      td.textContent = t;
      tr.append(td);
    }
    $("health").append(tr);
  }
  const images = local.reduce((a, r) => a + r.images, 0);
  const secondsPerImage = images ? local.reduce((a, r) => a + r.seconds, 0) / images : null;
  drawBreakEven(cost, secondsPerImage, closedPer);
}

// Monthly cost by images per day: a local machine is paid by the hour whether busy or not (as
// `easel cost` counts it), a closed API by the image.
function drawBreakEven(cost, secondsPerImage, closedPer) {
  const svg = $("chart");
  svg.innerHTML = "";
  const { gpu_hourly_usd: hourly, utilisation } = cost.local;
  if (!secondsPerImage || !closedPer || !hourly) {
    $("breakeven").textContent = "The chart needs a measured local image, a closed price and --gpu-hourly-usd.";
    return;
  }
  const perMachine = (86400 * utilisation) / secondsPerImage; // images a day one machine makes
  const localMonthly = (n) => Math.max(1, Math.ceil(n / perMachine)) * hourly * 24 * 30;
  const closedMonthly = (n) => n * 30 * closedPer;
  const breakeven = (hourly * 24) / closedPer;
  const maxN = Math.max(100, Math.ceil(breakeven * 3));
  const maxY = Math.max(localMonthly(maxN), closedMonthly(maxN));
  const x = (n) => 50 + (570 * n) / maxN;
  const y = (v) => 270 - (250 * v) / maxY;
  const path = (f, color, label) => {
    let d = "";
    for (let i = 0; i <= 100; i++) {
      const n = (maxN * i) / 100;
      d += `${i ? "L" : "M"}${x(n).toFixed(1)},${y(f(n)).toFixed(1)}`;
    }
    const p = document.createElementNS("http://www.w3.org/2000/svg", "path");
    p.setAttribute("d", d);
    p.setAttribute("fill", "none");
    p.setAttribute("stroke", color);
    p.setAttribute("stroke-width", "2");
    p.setAttribute("data-series", label);
    svg.append(p);
  };
  path(localMonthly, "#2f6feb", "local");
  path(closedMonthly, "#d14", "closed");
  const text = (t, tx, ty) => {
    const el = document.createElementNS("http://www.w3.org/2000/svg", "text");
    el.textContent = t;
    el.setAttribute("x", tx);
    el.setAttribute("y", ty);
    el.setAttribute("font-size", "11");
    svg.append(el);
  };
  text(`${maxN} images/day`, 540, 290);
  text(usd(maxY) + "/month", 52, 14);
  text("local (blue), closed (red)", 250, 290);
  $("breakeven").textContent = `Self-hosting breaks even above ${Math.round(breakeven)} images a day (one machine at ${usd(hourly)}/h makes about ${Math.round(perMachine)} a day at ${secondsPerImage.toFixed(2)} s per image and ${Math.round(utilisation * 100)}% utilisation; closed at ${usd(closedPer)} per image).`;
}

// ---- Wiring --------------------------------------------------------------------------------

function switchTab(name) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== `tab-${name}`;
  showError("");
  const load = { queue: refreshQueue, gallery: () => loadGallery(true), cost: loadCost }[name];
  if (load) load().catch((e) => showError(e.message));
}

function start() {
  $("api-key").value = localStorage.getItem("easel-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("easel-api-key", $("api-key").value.trim());
    loadModels().then(() => showError(""), (e) => showError(e.message));
  });
  for (const b of document.querySelectorAll("nav button")) b.onclick = () => switchTab(b.dataset.tab);
  $("form").addEventListener("submit", generate);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e);
  });
  $("model").onchange = fillSizes;
  $("cancel").onclick = cancelCurrent;
  $("reuse-seed").onclick = () => {
    if (state.lastSeed !== null) {
      $("seed").value = state.lastSeed;
      $("random-seed").checked = false;
    }
  };
  $("lora-add").onclick = () => addLora($("lora-name").value, $("lora-scale").value);
  $("more").onclick = () => loadGallery(false).catch((e) => showError(e.message));
  $("close-detail").onclick = () => $("detail").close();
  setInterval(() => {
    if (!$("tab-queue").hidden) refreshQueue().catch(() => {});
  }, 2000);
  loadModels().catch((e) => showError(e.message));
}

start();
