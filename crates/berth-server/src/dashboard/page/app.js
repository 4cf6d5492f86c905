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

function button(label, aria, action, data, danger, run) {
  const b = document.createElement("button");
  b.type = "button";
  if (danger) b.className = "danger";
  b.textContent = label;
  b.setAttribute("aria-label", aria);
  b.dataset.action = action;
  Object.assign(b.dataset, data);
  b.addEventListener("click", run);
  return b;
}

function unloadsText(m) {
  if (!m.loaded) return "–";
  if (m.pinned) return "never (pinned)";
  if (m.idle_seconds === null) return "when idle";
  return m.unloads_in_seconds === null ? "never" : "in " + m.unloads_in_seconds + " s";
}

/// The store's models and those in memory; for admin keys, what each can be made to do.
function renderModels(models) {
  const body = $("models").tBodies[0];
  body.replaceChildren();
  const count = (v) => (v === undefined ? "–" : String(v));
  for (const m of models) {
    const row = document.createElement("tr");
    cell(row, m.name);
    cell(row, m.version);
    const as = m.loaded_as && m.loaded_as !== m.name ? " · as " + m.loaded_as : "";
    cell(row, m.state + as + (m.pinned ? " · pinned" : ""));
    cell(row, m.loaded ? bytes(m.memory) : bytes(m.size) + " on disk");
    cell(row, count(m.running));
    cell(row, count(m.waiting));
    cell(row, m.kv_usage === undefined ? "–" : (m.kv_usage * 100).toFixed(0) + "%");
    cell(row, count(m.context));
    cell(row, unloadsText(m));
    const actions = cell(row, "");
    if (admin) {
      const data = { model: m.name };
      if (m.loaded) {
        actions.appendChild(button("Unload", "Unload " + m.name, "unload", data, true, () => manage(m.name, "unload")));
      } else if (m.kind === "chat") {
        actions.appendChild(button("Load", "Load " + m.name, "load", data, false, () => manage(m.name, "load")));
      }
      const pin = m.pinned ? "unpin" : "pin";
      const label = m.pinned ? "Unpin" : "Pin";
      actions.appendChild(button(label, label + " " + m.name, pin, data, false, () => manage(m.name, pin)));
    }
    body.appendChild(row);
  }
  $("models-empty").hidden = models.length > 0;
}

/// Load, unload, pin or unpin a model through the API (Ollama's load and unload; berth's pin).
async function manage(model, action) {
  const calls = {
    load: ["/api/generate", { model: model }],
    unload: ["/api/generate", { model: model, keep_alive: 0 }],
    pin: ["/api/pin", { model: model, pin: true }],
    unpin: ["/api/pin", { model: model, pin: false }],
  };
  const [path, body] = calls[action];
  setStatus(action + ": " + model + "…");
  try {
    await api(path, { method: "POST", body: JSON.stringify(body) });
    setStatus(action + ": " + model + " done");
    await refresh();
  } catch (e) {
    setStatus("cannot " + action + " " + model + ": " + e.message, true);
  }
}

/// A gateway's replicas: health, load, and what was sent to each.
function renderReplicas(replicas, gateway) {
  const body = $("replicas").tBodies[0];
  body.replaceChildren();
  for (const r of replicas) {
    const row = document.createElement("tr");
    cell(row, r.url + (r.remote ? " (remote)" : ""));
    cell(row, r.health).classList.toggle("bad", r.health !== "up");
    cell(row, String(r.in_flight));
    cell(row, String(r.running));
    cell(row, String(r.waiting));
    cell(row, (r.kv_cache_usage * 100).toFixed(0) + "%");
    cell(row, String(r.answered));
    cell(row, String(r.failures));
    cell(row, String(r.ejections));
    cell(row, r.models.join(", ") || "–");
    body.appendChild(row);
  }
  $("gateway-summary").textContent =
    gateway.in_flight + " in flight · " + gateway.queue + " waiting at the gateway · " +
    gateway.queue_refused + " refused for a full queue · " + gateway.unserved + " with no replica";
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

/// The history's choices (each model, or on a gateway each replica), keeping the one chosen.
function renderChoices(history, kind) {
  $("chart-of-label").textContent = kind === "gateway" ? "Replica" : "Model";
  const select = $("chart-of");
  const names = [""].concat(history.choices);
  const shown = [...select.options].map((o) => o.value);
  if (shown.join("\n") === names.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren();
  for (const name of names) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name || "all";
    select.appendChild(option);
  }
  select.value = names.includes(chosen) ? chosen : "";
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

function deploymentButton(label, name, action, danger) {
  const run = async () => {
    try {
      await api("/api/deployments/" + encodeURIComponent(name) + "/" + action, { method: "POST", body: "{}" });
      setStatus(action + ": " + name);
      await refresh();
    } catch (e) {
      setStatus("cannot " + action + " " + name + ": " + e.message, true);
    }
  };
  return button(label, label + " the deployment " + name, action, { deployment: name }, danger, run);
}

function guardsText(policy) {
  const g = policy.guards;
  const parts = [];
  if (g.max_error_rate !== null) parts.push("errors ≤ " + (g.max_error_rate * 100).toFixed(1) + "%");
  if (g.max_ttft_ratio !== null) parts.push("TTFT p95 ≤ " + g.max_ttft_ratio + "× stable");
  if (parts.length === 0) return "none";
  const steps = policy.interval_seconds ? ", +" + policy.step + "% every " + policy.interval_seconds + " s" : "";
  return parts.join(", ") + " over " + g.window_seconds + " s, from " + g.min_requests + " requests" + steps;
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
    cell(row, r ? r.to.source + " (" + r.to.version + "): " + r.state : "–");
    cell(row, d.traffic.map((t) => t.version + " " + t.weight + "%").join(" · "));
    cell(row, guardsText(d.policy));
    const w = d.window && d.window.canary;
    cell(row, r && w ? w.requests + " requests, " + w.failed + " failed" : "–");
    const actions = cell(row, "");
    if (r) {
      if (r.state === "canary" && r.weight < 100) actions.appendChild(deploymentButton("Step", d.name, "step", false));
      actions.appendChild(deploymentButton("Promote", d.name, "promote", false));
      actions.appendChild(deploymentButton("Abort", d.name, "abort", true));
    } else if (d.previous) {
      actions.appendChild(deploymentButton("Roll back", d.name, "rollback", true));
    }
    body.appendChild(row);
  }
}

function renderUsage(usage) {
  $("usage-section").hidden = !usage;
  if (!usage) return;
  const by = $("usage-by").value;
  $("usage-group").textContent = by === "model" ? "Model" : "Key";
  const body = $("usage").tBodies[0];
  body.replaceChildren();
  for (const [period, rows] of [["today", usage[by].today], ["7 days", usage[by].week]]) {
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
    const of = $("chart-of").value;
    const state = await (await api("/ui/state" + (of ? "?of=" + encodeURIComponent(of) : ""))).json();
    const gateway = state.kind === "gateway";
    admin = state.admin;
    $("key-form").hidden = true;
    $("forget-key").hidden = !key();
    $("who").textContent = state.caller ? "key: " + state.caller.name + " (" + state.caller.scopes.join(", ") + ")" : "";
    $("models-section").hidden = gateway;
    $("replicas-section").hidden = !gateway;
    // A gateway sees when answers start, not the time between their tokens.
    $("figure-itl").hidden = gateway;
    if (gateway) renderReplicas(state.replicas, state.gateway);
    else renderModels(state.models);
    renderChoices(state.history, state.kind);
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
  const schema = $("play-schema").value.trim();
  if (schema) {
    try {
      body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse(schema), strict: true } };
    } catch (e) {
      stats.textContent = "error: the JSON schema is not JSON: " + e.message;
      return;
    }
  }
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
  $("chart-of").addEventListener("change", refresh);
  $("usage-by").addEventListener("change", refresh);
  refresh();
  loadModels();
  if (polling === null) polling = setInterval(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
