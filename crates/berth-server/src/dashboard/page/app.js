// berth's dashboard: polls /ui/state, draws the last 15 minutes, and runs a playground through the
// OpenAI API. Every call carries the key the user gave (kept in this tab's session storage only),
// so the page can do exactly what that key may. Text from the server always goes in as text.
"use strict";

const KEY = "berth-api-key";
const POLL_MS = 2000;
let admin = false;
let polling = null;

function key() {
  return sessionStorage.getItem(KEY) || "";
}

function headers(json) {
  const h = {};
  if (key()) h["Authorization"] = "Bearer " + key();
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function $(id) {
  return document.getElementById(id);
}

function setStatus(text, error) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", !!error);
}

/// The message of an API error body, whichever API's shape it has.
async function errorText(response) {
  try {
    const body = await response.json();
    const e = body.error;
    if (typeof e === "string") return e;
    if (e && e.message) return e.message;
  } catch (_) {
    // Not JSON: the status says enough.
  }
  return "HTTP " + response.status;
}

/// A call to the API; a 401 asks for a key.
async function api(path, options) {
  const response = await fetch(path, Object.assign({ headers: headers(options && options.body) }, options || {}));
  if (response.status === 401) {
    $("key-form").hidden = false;
    throw new Error(key() ? "the API key was refused: " + (await errorText(response)) : "this server needs an API key");
  }
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

function bytes(n) {
  if (n >= 1 << 30) return (n / (1 << 30)).toFixed(1) + " GiB";
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(0) + " MiB";
  return n + " B";
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function renderModels(models) {
  const body = $("models").tBodies[0];
  body.replaceChildren();
  for (const m of models) {
    const row = document.createElement("tr");
    cell(row, m.name);
    cell(row, m.version);
    cell(row, bytes(m.memory));
    cell(row, m.running === undefined ? "–" : String(m.running));
    cell(row, m.waiting === undefined ? "–" : String(m.waiting));
    cell(row, m.context === undefined ? "–" : String(m.context));
    cell(row, m.pinned ? "pinned" : m.unloads_in_seconds === null ? "never" : "in " + m.unloads_in_seconds + " s");
    const actions = cell(row, "");
    if (admin) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "danger";
      button.textContent = "Unload";
      button.setAttribute("aria-label", "Unload " + m.name);
      button.dataset.model = m.name;
      button.addEventListener("click", () => unload(m.name));
      actions.appendChild(button);
    }
    body.appendChild(row);
  }
  $("models-empty").hidden = models.length > 0;
}

async function unload(model) {
  try {
    await api("/api/generate", { method: "POST", body: JSON.stringify({ model: model, keep_alive: 0 }) });
    setStatus("unloaded " + model);
    await refresh();
  } catch (e) {
    setStatus("cannot unload " + model + ": " + e.message, true);
  }
}

function color(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || "#888";
}

/// A line chart of `series` (one or two lists of numbers) on a canvas sized for the screen.
function draw(canvas, series) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 320;
  const height = canvas.clientHeight || 120;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const all = series.flat().filter(Number.isFinite);
  const top = Math.max(1e-9, ...all) * 1.1;
  const colors = [color("--accent"), color("--warn")];
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = color("--muted");
  g.fillText(all.length ? Math.max(...all).toFixed(1) : "0", 4, 12);
  series.forEach((values, i) => {
    if (values.length === 0) return;
    g.strokeStyle = colors[i % colors.length];
    g.fillStyle = colors[i % colors.length];
    if (values.length === 1) {
      // The first sample: a dot at the right edge until there is a line to draw.
      if (Number.isFinite(values[0])) g.fillRect(width - 6, height - 4 - (values[0] / top) * (height - 16), 4, 4);
      return;
    }
    g.lineWidth = 1.5;
    g.beginPath();
    let drawing = false;
    values.forEach((v, x) => {
      // An interval without a value (no request finished) breaks the line.
      if (!Number.isFinite(v)) {
        drawing = false;
        return;
      }
      const px = (x / (values.length - 1)) * (width - 2) + 1;
      const py = height - 2 - (v / top) * (height - 16);
      if (drawing) g.lineTo(px, py);
      else g.moveTo(px, py);
      // A value with no neighbour to join gets a dot of its own.
      if (!Number.isFinite(values[x - 1]) && !Number.isFinite(values[x + 1])) g.fillRect(px - 2, py - 2, 4, 4);
      drawing = true;
    });
    g.stroke();
  });
}

function renderHistory(history, totals) {
  const s = history.samples;
  const pick = (k) => s.map((x) => x[k]);
  draw($("chart-tokens"), [pick("tokens_per_s")]);
  draw($("chart-requests"), [pick("requests_per_s")]);
  draw($("chart-queue"), [pick("running"), pick("waiting")]);
  draw($("chart-kv"), [pick("kv_usage").map((v) => v * 100)]);
  const ms = (k) => s.map((x) => (x[k] === null ? NaN : x[k] * 1000));
  draw($("chart-ttft"), [ms("ttft_p50"), ms("ttft_p95")]);
  draw($("chart-itl"), [ms("itl_p50"), ms("itl_p95")]);
  const latest = (k) => {
    for (let i = s.length - 1; i >= 0; i--) if (s[i][k] !== null) return (s[i][k] * 1000).toFixed(0) + " ms";
    return "–";
  };
  $("now-ttft").textContent = latest("ttft_p50") + " / " + latest("ttft_p95");
  $("now-itl").textContent = latest("itl_p50") + " / " + latest("itl_p95");
  const last = s.length ? s[s.length - 1] : null;
  $("now-tokens").textContent = last ? last.tokens_per_s.toFixed(1) : "0";
  $("now-requests").textContent = last ? last.requests_per_s.toFixed(2) : "0";
  $("now-queue").textContent = last ? last.running + " / " + last.waiting : "0 / 0";
  $("now-kv").textContent = last ? (last.kv_usage * 100).toFixed(0) + "%" : "0%";
  $("total-tokens").textContent = String(totals.generated_tokens);
  $("total-requests").textContent = String(totals.requests);
}

function actionButton(label, name, action, danger) {
  const button = document.createElement("button");
  button.type = "button";
  if (danger) button.className = "danger";
  button.textContent = label;
  button.setAttribute("aria-label", label + " the rollout of " + name);
  button.dataset.deployment = name;
  button.dataset.action = action;
  button.addEventListener("click", async () => {
    try {
      await api("/api/deployments/" + encodeURIComponent(name) + "/" + action, { method: "POST", body: "{}" });
      setStatus(action + ": " + name);
      await refresh();
    } catch (e) {
      setStatus("cannot " + action + " " + name + ": " + e.message, true);
    }
  });
  return button;
}

/// Deployments and their rollouts (admin keys only: the API's deployments need the admin scope).
async function refreshDeployments() {
  if (!admin) {
    $("deployments-section").hidden = true;
    return;
  }
  const list = (await (await api("/api/deployments")).json()).deployments;
  $("deployments-section").hidden = list.length === 0;
  const body = $("deployments").tBodies[0];
  body.replaceChildren();
  for (const d of list) {
    const row = document.createElement("tr");
    cell(row, d.name);
    cell(row, d.stable.source + " (" + d.stable.version + ")");
    const r = d.rollout;
    cell(row, r ? r.to.source + " (" + r.to.version + "): " + r.state + ", " + r.weight + "%" : "–");
    const w = d.window && d.window.canary;
    cell(row, r && w ? w.requests + " requests, " + w.failed + " failed" : "–");
    const actions = cell(row, "");
    if (r) {
      actions.appendChild(actionButton("Promote", d.name, "promote", false));
      actions.appendChild(actionButton("Abort", d.name, "abort", true));
    }
    body.appendChild(row);
  }
}

function renderUsage(usage) {
  $("usage-section").hidden = !usage;
  if (!usage) return;
  const body = $("usage").tBodies[0];
  body.replaceChildren();
  for (const [period, rows] of [["today", usage.today], ["7 days", usage.week]]) {
    for (const r of rows) {
      const row = document.createElement("tr");
      cell(row, r.name ? r.name + " (" + r.group + ")" : r.group);
      cell(row, period);
      for (const k of ["requests", "completed", "rejected", "aborted", "failed", "prompt_tokens", "completion_tokens"]) {
        cell(row, String(r[k]));
      }
      body.appendChild(row);
    }
  }
}

async function refresh() {
  try {
    const state = await (await api("/ui/state")).json();
    admin = state.admin;
    $("key-form").hidden = true;
    $("forget-key").hidden = !key();
    $("who").textContent = state.caller ? "key: " + state.caller.name + " (" + state.caller.scopes.join(", ") + ")" : "";
    renderModels(state.models);
    renderHistory(state.history, state.totals);
    renderUsage(state.usage);
    await refreshDeployments();
    setStatus("live · updated " + new Date().toLocaleTimeString());
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function loadModels() {
  try {
    const list = await (await api("/v1/models")).json();
    const select = $("play-model");
    const chosen = select.value;
    select.replaceChildren();
    for (const m of list.data) {
      if (m.capabilities && !m.capabilities.includes("completion")) continue;
      const option = document.createElement("option");
      option.value = m.id;
      option.textContent = m.id;
      select.appendChild(option);
    }
    if (chosen) select.value = chosen;
  } catch (e) {
    setStatus(e.message, true);
  }
}

/// Send the playground's message and stream the answer in, with its TTFT and tokens per second.
async function play(event) {
  event.preventDefault();
  const answer = $("play-answer");
  const stats = $("play-stats");
  answer.textContent = "";
  stats.textContent = "";
  const messages = [];
  if ($("play-system").value.trim()) messages.push({ role: "system", content: $("play-system").value });
  messages.push({ role: "user", content: $("play-prompt").value });
  const body = {
    model: $("play-model").value,
    messages: messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("play-temperature").value),
    max_tokens: Number($("play-max").value),
  };
  $("play-send").disabled = true;
  const started = performance.now();
  let first = null;
  let tokens = 0;
  try {
    const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body) });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      let end;
      while ((end = pending.indexOf("\n\n")) >= 0) {
        const event = pending.slice(0, end);
        pending = pending.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message || "the stream ended with an error");
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now();
            answer.textContent += delta.content;
          }
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
        }
      }
    }
    const end = performance.now();
    const ttft = first === null ? end - started : first - started;
    const rate = first !== null && end > first && tokens > 1 ? ((tokens - 1) * 1000) / (end - first) : 0;
    stats.textContent = "TTFT " + ttft.toFixed(0) + " ms · " + tokens + " tokens · " + rate.toFixed(1) + " tokens/s";
  } catch (e) {
    stats.textContent = "error: " + e.message;
  } finally {
    $("play-send").disabled = false;
  }
}

function start() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    $("key-form").hidden = true;
    $("forget-key").hidden = !key();
    refresh();
    loadModels();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    $("forget-key").hidden = true;
    $("key-form").hidden = false;
    $("key").focus();
  });
  $("play").addEventListener("submit", play);
  refresh();
  loadModels();
  if (polling === null) polling = setInterval(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
