// Iris operator console: talks only to Iris's admin API, with the admin key
// kept in this tab's memory and sessionStorage (never a URL, a cookie or
// localStorage). Every value from the API is rendered as text.

const KEY_SLOT = "iris-admin-key";
const numbers = new Intl.NumberFormat();
const $ = (id) => document.getElementById(id);

let adminKey = sessionStorage.getItem(KEY_SLOT) || "";

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${adminKey}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
  });
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!response.ok) {
    const message = json && json.error && json.error.message ? json.error.message : `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message);
  }
  return json;
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function fmt(n) {
  return n === null || n === undefined ? "–" : numbers.format(n);
}

/** A time in the viewer's zone, with UTC on hover. */
function timeNode(unixSeconds) {
  const date = new Date(unixSeconds * 1000);
  return el("time", date.toLocaleString(), { datetime: date.toISOString(), title: `${date.toISOString().replace(".000", "")} UTC` });
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
}

async function guarded(action) {
  try {
    showError("");
    await action();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      logout(error.message);
      return;
    }
    showError(error.message);
  }
}

// --- login ------------------------------------------------------------------

function logout(message) {
  adminKey = "";
  sessionStorage.removeItem(KEY_SLOT);
  $("app").hidden = true;
  $("nav").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function login(key) {
  adminKey = key;
  try {
    await api("GET", "/admin/clients");
  } catch (error) {
    logout(error.message);
    return;
  }
  sessionStorage.setItem(KEY_SLOT, key);
  $("login").hidden = true;
  $("app").hidden = false;
  $("nav").hidden = false;
  $("login-error").textContent = "";
  await refresh();
}

// --- clients ------------------------------------------------------------------

const WINDOWS = ["requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month", "max_concurrent"];

function budgetCell(client) {
  const cell = el("td");
  const usage = client.usage || {};
  let any = false;
  for (const name of WINDOWS) {
    const window = usage[name];
    if (!window || window.limit === null || window.limit === undefined) continue;
    any = true;
    const row = el("div", null, { class: "window" });
    row.append(el("span", name.replaceAll("_", " "), { class: "label" }));
    const bar = el("span", null, { class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": String(window.limit), "aria-valuenow": String(window.used) });
    const share = window.limit > 0 ? Math.min(1, window.used / window.limit) : 0;
    const fill = el("span", null, { class: share >= 0.9 ? "fill hot" : "fill" });
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    bar.append(fill);
    row.append(bar, el("span", `${fmt(window.used)} / ${fmt(window.limit)}`, { class: "figures" }));
    cell.append(row);
  }
  if (!any) cell.append(el("span", "no limits", { class: "muted" }));
  return cell;
}

function actionsCell(client) {
  const cell = el("td", null, { class: "actions" });
  const managed = client.source === "managed";
  const reason = "Defined in the config file: change it there, then reload.";
  const button = (label, handler) => {
    const b = el("button", label, { type: "button" });
    if (managed) b.addEventListener("click", () => guarded(handler));
    else {
      b.disabled = true;
      b.title = reason;
    }
    return b;
  };
  const toggle = client.disabled ? "Enable" : "Disable";
  cell.append(button(toggle, async () => {
    await api("PATCH", `/admin/clients/${encodeURIComponent(client.name)}`, { disabled: !client.disabled });
    await loadClients();
  }));
  const grace = el("input", null, { type: "number", min: "0", value: "0", class: "grace", title: "Seconds the old key keeps working", "aria-label": `Grace seconds for ${client.name}` });
  if (!managed) grace.disabled = true;
  cell.append(button("Rotate", async () => {
    const answer = await api("POST", `/admin/clients/${encodeURIComponent(client.name)}/rotate`, { grace_s: Number(grace.value || 0) });
    showKey(answer.client.name, answer.key);
    await loadClients();
  }), grace);
  cell.append(button("Delete", async () => {
    if (!window.confirm(`Delete ${client.name}? Its key stops working.`)) return;
    await api("DELETE", `/admin/clients/${encodeURIComponent(client.name)}`);
    await loadClients();
  }));
  if (!managed) cell.append(el("span", reason, { class: "muted reason" }));
  return cell;
}

async function loadClients() {
  const list = await api("GET", "/admin/clients");
  const body = $("clients-table").tBodies[0];
  body.replaceChildren();
  for (const client of list.data) {
    const row = el("tr", null, { "data-client": client.name });
    const name = el("td", client.name, { class: "name" });
    if (client.disabled) name.append(el("span", " (disabled)", { class: "muted" }));
    row.append(name, el("td", client.source), el("td", client.models.join(", ")), budgetCell(client), actionsCell(client));
    body.append(row);
  }
  $("clients-empty").hidden = list.data.length > 0;
  $("managed-empty").hidden = list.data.some((c) => c.source === "managed");
}

function showKey(name, key) {
  $("new-key-client").textContent = name;
  $("new-key-value").textContent = key;
  $("new-key").hidden = false;
}

async function createClient(form) {
  const data = new FormData(form);
  const request = { name: String(data.get("name")).trim() };
  const models = String(data.get("models") || "").trim();
  if (models) request.models = models.split(",").map((m) => m.trim()).filter(Boolean);
  const budget = {};
  for (const name of ["tokens_per_day", "tokens_per_minute", "requests_per_minute"]) {
    const value = String(data.get(name) || "").trim();
    if (value) budget[name] = Number(value);
  }
  if (Object.keys(budget).length) request.budget = budget;
  const answer = await api("POST", "/admin/clients", request);
  form.reset();
  showKey(answer.client.name, answer.key);
  await loadClients();
}

// --- spend ------------------------------------------------------------------

function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

function thisMonth() {
  const now = new Date();
  const first = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1));
  const next = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1));
  return [isoDay(first), isoDay(next)];
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

/** Horizontal bars: prompt and completion tokens per row. */
function barChart(container, rows, labelKey) {
  container.replaceChildren();
  if (!rows.length) return;
  const width = 480;
  const line = 22;
  const labelWidth = 140;
  const max = Math.max(1, ...rows.map((r) => r.prompt_tokens + r.completion_tokens));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${rows.length * line + 4}`, width: "100%", role: "img", "aria-label": `Tokens by ${labelKey}` });
  rows.forEach((row, i) => {
    const y = i * line + 2;
    const scale = (width - labelWidth - 90) / max;
    chart.append(svg("text", { x: 0, y: y + 15, class: "axis" }, row[labelKey]));
    const prompt = row.prompt_tokens * scale;
    const completion = row.completion_tokens * scale;
    chart.append(svg("rect", { x: labelWidth, y, width: Math.max(prompt, 0.5), height: line - 6, class: "prompt" }));
    chart.append(svg("rect", { x: labelWidth + prompt, y, width: Math.max(completion, 0.5), height: line - 6, class: "completion" }));
    chart.append(svg("text", { x: labelWidth + prompt + completion + 4, y: y + 15, class: "axis" }, fmt(row.prompt_tokens + row.completion_tokens)));
  });
  container.append(chart, legend());
}

function legend() {
  const box = el("p", null, { class: "legend" });
  box.append(el("span", "prompt", { class: "key prompt" }), el("span", "completion", { class: "key completion" }));
  return box;
}

/** Vertical bars: tokens per day. */
function dayChart(container, days) {
  container.replaceChildren();
  const width = 720;
  const height = 180;
  const max = Math.max(1, ...days.map((d) => d.tokens));
  const barWidth = width / days.length;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 20}`, width: "100%", role: "img", "aria-label": "Tokens per day" });
  days.forEach((day, i) => {
    const h = (day.tokens / max) * height;
    const bar = svg("rect", { x: i * barWidth + 1, y: height - h, width: Math.max(barWidth - 2, 1), height: Math.max(h, 0.5), class: "completion" });
    bar.append(svg("title", {}, `${day.day}: ${fmt(day.tokens)} tokens`));
    chart.append(bar);
    if (i % 5 === 0) chart.append(svg("text", { x: i * barWidth, y: height + 15, class: "axis" }, day.day.slice(5)));
  });
  container.append(chart);
}

function spendTable(table, rows, key) {
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const row of rows) {
    const tr = el("tr");
    tr.append(el("td", row[key]), el("td", fmt(row.requests)), el("td", fmt(row.errors)), el("td", fmt(row.prompt_tokens)), el("td", fmt(row.completion_tokens)));
    body.append(tr);
  }
}

async function loadSpend() {
  const form = $("period");
  const since = form.elements.since.value;
  const until = form.elements.until.value;
  const query = (by, from, to) => `/admin/usage?since=${encodeURIComponent(from)}&until=${encodeURIComponent(to)}&by=${by}`;
  const [byClient, byModel] = await Promise.all([api("GET", query("client", since, until)), api("GET", query("model", since, until))]);
  const sorted = (rows) => [...rows].sort((a, b) => b.prompt_tokens + b.completion_tokens - (a.prompt_tokens + a.completion_tokens));
  spendTable($("spend-client"), sorted(byClient.data), "client");
  spendTable($("spend-model"), sorted(byModel.data), "model");
  barChart($("chart-client"), sorted(byClient.data), "client");
  barChart($("chart-model"), sorted(byModel.data), "model");
  $("spend-empty").hidden = byClient.data.length > 0;

  const today = new Date();
  const start = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - 29));
  const end = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() + 1));
  const byDay = await api("GET", query("day", isoDay(start), isoDay(end)));
  const tokens = new Map(byDay.data.map((row) => [row.day, row.prompt_tokens + row.completion_tokens]));
  const days = [];
  for (let i = 0; i < 30; i++) {
    const day = isoDay(new Date(start.getTime() + i * 86400000));
    days.push({ day, tokens: tokens.get(day) || 0 });
  }
  dayChart($("chart-days"), days);
}

// --- upstreams ------------------------------------------------------------------

async function loadUpstreams() {
  const list = await api("GET", "/admin/upstreams");
  const body = $("upstreams-table").tBodies[0];
  body.replaceChildren();
  for (const row of list.data) {
    const tr = el("tr", null, { "data-deployment": row.deployment });
    const state = el("td", null, { class: row.state === "healthy" ? "ok" : "hot" });
    if (row.cooling_until) {
      state.append(el("span", "cooling down until "), timeNode(row.cooling_until));
    } else {
      state.textContent = "healthy";
    }
    const room = el("td");
    if (row.pacing) {
      const parts = [];
      for (const [name, window] of Object.entries(row.pacing)) {
        if (window.limit !== null && window.limit !== undefined) parts.push(`${name.replaceAll("_", " ")}: ${fmt(window.remaining)} of ${fmt(window.limit)}`);
      }
      room.textContent = parts.join("; ") || "no limits";
    } else {
      room.append(el("span", "no limits", { class: "muted" }));
    }
    tr.append(el("td", row.deployment), el("td", row.models.join(", ")), state, el("td", fmt(row.attempts_5m)), el("td", fmt(row.failures_5m)), room);
    body.append(tr);
  }
  $("upstreams-empty").hidden = list.data.length > 0;
}

async function refresh() {
  await guarded(async () => {
    await Promise.all([loadClients(), loadSpend(), loadUpstreams()]);
  });
}

// --- wiring -------------------------------------------------------------------

function start() {
  const [since, until] = thisMonth();
  $("period").elements.since.value = since;
  $("period").elements.until.value = until;
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("admin-key");
    const key = input.value;
    input.value = "";
    login(key);
  });
  $("logout").addEventListener("click", () => logout(""));
  $("refresh").addEventListener("click", refresh);
  $("period").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(loadSpend);
  });
  $("create-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(() => createClient(event.target));
  });
  $("copy-key").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("new-key-value").textContent);
      $("copy-key").textContent = "Copied";
    } catch {
      // Clipboard refused (no permission): select the key for a manual copy.
      const range = document.createRange();
      range.selectNodeContents($("new-key-value"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
    }
  });
  $("dismiss-key").addEventListener("click", () => {
    $("new-key").hidden = true;
    $("new-key-value").textContent = "";
    $("copy-key").textContent = "Copy";
  });
  if (adminKey) login(adminKey);
}

start();
