// Iris operator console: talks only to Iris's admin API, with the admin key
// kept in this tab's memory and sessionStorage (never a URL, a cookie or
// localStorage). Every value from the API is rendered as text.

const KEY_SLOT = "iris-admin-key";
const numbers = new Intl.NumberFormat();
// Money: at least to the cent, at most to the millionth (what Iris counts).
const amounts = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 6 });
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

function money(n) {
  return n === null || n === undefined ? "–" : amounts.format(n);
}

/** The currency of every amount the admin API answers (`[pricing] currency`). */
let currency = "";

/** A time in the viewer's zone, with UTC on hover. */
function timeNode(unixSeconds) {
  const date = new Date(unixSeconds * 1000);
  const utc = `${date.toISOString().slice(0, 19).replace("T", " ")} UTC`;
  return el("time", date.toLocaleString(), { datetime: date.toISOString(), title: utc });
}

function showError(message) {
  $("error").textContent = message || "";
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

/** Forgets the key and every value shown with it. */
function logout(message) {
  adminKey = "";
  sessionStorage.removeItem(KEY_SLOT);
  $("app").hidden = true;
  $("nav").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  for (const table of document.querySelectorAll("#app table")) {
    for (const section of [...table.tBodies, table.tFoot]) section?.replaceChildren();
  }
  for (const chart of document.querySelectorAll("#app .chart")) chart.replaceChildren();
  $("spend-total-cost").textContent = "";
  $("spend-total").hidden = true;
  currency = "";
  showCurrency();
  charts.clear();
  dismissKey();
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

const WINDOWS = ["requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month", "cost_per_day", "cost_per_month", "max_concurrent"];

/** used / limit of a window: amounts of money with the currency. */
function figures(name, window) {
  if (!name.startsWith("cost_")) return `${fmt(window.used)} / ${fmt(window.limit)}`;
  return `${money(window.used)} / ${money(window.limit)} ${currency}`;
}

/** Each budget window with a limit as a bar, used / limit: a client's or a team's. */
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
    const bar = el("span", null, { class: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": String(window.limit), "aria-valuenow": String(window.used), "aria-label": name.replaceAll("_", " ") });
    const share = window.limit > 0 ? Math.min(1, window.used / window.limit) : 0;
    const fill = el("span", null, { class: share >= 0.9 ? "fill hot" : "fill" });
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    bar.append(fill);
    row.append(bar, el("span", figures(name, window), { class: "figures" }));
    cell.append(row);
  }
  if (!any) cell.append(el("span", "no limits", { class: "muted" }));
  return cell;
}

/** Why a config file's client or team has no working buttons. */
const CONFIG_REASON = "Defined in the config file: change it there, then reload.";

/**
 * A row's button: runs `handler` (its errors shown like every action's) when
 * the row is managed; else disabled, with the reason.
 */
function actionButton(label, managed, handler) {
  const b = el("button", label, { type: "button" });
  if (managed) b.addEventListener("click", () => guarded(handler));
  else {
    b.disabled = true;
    b.title = CONFIG_REASON;
  }
  return b;
}

/** Asks, then deletes a managed client or team and reloads both tables. */
function deleteButton(kind, name, consequence) {
  return actionButton("Delete", true, async () => {
    if (!window.confirm(`Delete ${name}? ${consequence}`)) return;
    await api("DELETE", `/admin/${kind}/${encodeURIComponent(name)}`);
    await loadDirectory();
  });
}

function actionsCell(client) {
  const cell = el("td");
  const box = el("div", null, { class: "actions" });
  cell.append(box);
  const managed = client.source === "managed";
  const button = (label, handler) => actionButton(label, managed, handler);
  const toggle = client.disabled ? "Enable" : "Disable";
  box.append(button(toggle, async () => {
    await api("PATCH", `/admin/clients/${encodeURIComponent(client.name)}`, { disabled: !client.disabled });
    await loadDirectory();
  }));
  const grace = el("input", null, { type: "number", min: "0", value: "0", class: "grace", title: "Seconds the current key keeps working after Rotate", "aria-label": `Grace seconds for ${client.name}` });
  if (!managed) grace.disabled = true;
  const graceLabel = el("label", null, { class: "grace-label" });
  graceLabel.append(grace, el("span", "s grace"));
  box.append(button("Rotate", async () => {
    const answer = await api("POST", `/admin/clients/${encodeURIComponent(client.name)}/rotate`, { grace_s: Number(grace.value || 0) });
    showKey(answer.client.name, answer.key);
    await loadDirectory();
  }), graceLabel);
  if (managed) box.append(deleteButton("clients", client.name, "Its key stops working."));
  else box.append(button("Delete"), el("span", CONFIG_REASON, { class: "muted reason" }));
  return cell;
}

function sourceCell(client) {
  const cell = el("td", client.source, { class: "source" });
  if (client.created_at) {
    const created = el("div", "created ", { class: "muted small" });
    created.append(timeNode(client.created_at));
    cell.append(created);
  }
  // The key's policy: when it stops (or stopped) working, and from where.
  if (client.expires_at) {
    const at = Date.parse(client.expires_at) / 1000;
    const past = at * 1000 <= Date.now();
    const expires = el("div", past ? "expired " : "expires ", { class: past ? "expired small" : "muted small" });
    expires.append(timeNode(at));
    cell.append(expires);
  }
  if (client.allowed_networks && client.allowed_networks.length) {
    cell.append(el("div", `only from ${client.allowed_networks.join(", ")}`, { class: "muted small networks" }));
  }
  return cell;
}

function showClients(list) {
  currency = list.currency || currency;
  const body = $("clients-table").tBodies[0];
  body.replaceChildren();
  for (const client of list.data) {
    const row = el("tr", null, { "data-client": client.name });
    const name = el("td", client.name, { class: "name" });
    if (client.disabled) name.append(el("span", " (disabled)", { class: "muted" }));
    const team = client.team ? el("td", client.team, { class: "team" }) : el("td", "–", { class: "team muted" });
    const cells = [name, sourceCell(client), el("td", client.models.join(", ")), team, budgetCell(client), actionsCell(client)];
    ["Name", "Source", "Models", "Team", "Budget", "Actions"].forEach((label, i) => i > 0 && cells[i].setAttribute("data-label", label));
    row.append(...cells);
    body.append(row);
  }
  $("clients-table").hidden = list.data.length === 0;
  $("clients-empty").hidden = list.data.length > 0;
  $("managed-empty").hidden = list.data.some((c) => c.source === "managed");
}

// --- teams ------------------------------------------------------------------

/** The members' names, or a count when there are many. */
function membersCell(team) {
  const cell = el("td", null, { class: "members" });
  const members = team.members || [];
  if (!members.length) cell.append(el("span", "no clients", { class: "muted" }));
  else if (members.length <= 5) cell.textContent = members.join(", ");
  else {
    cell.textContent = `${fmt(members.length)} clients`;
    cell.title = members.join(", ");
  }
  return cell;
}

/** The limits a team's forms set: money ones in the currency of the API's amounts. */
const COST_LIMITS = [
  ["cost_per_day", "Cost per day"],
  ["cost_per_month", "Cost per month"],
];
const TEAM_LIMITS = [
  ...COST_LIMITS,
  ["tokens_per_day", "Tokens per day"],
  ["tokens_per_month", "Tokens per month"],
];
/** The client form's limits: its static token fields, then the money ones. */
const CLIENT_LIMITS = ["tokens_per_day", "tokens_per_minute", "requests_per_minute", ...COST_LIMITS.map(([name]) => name)];

/** Labelled inputs for `limits`, filled from `values` (a team's windows), money ones with the currency. */
function limitFields(limits, values = {}) {
  return limits.map(([name, label]) => {
    const money = name.startsWith("cost_");
    const input = el("input", null, { name, type: "number", min: money ? "0" : "1", step: money ? "any" : "1" });
    const limit = values[name] && values[name].limit;
    if (limit !== null && limit !== undefined) input.value = String(limit);
    const caption = el("span", label);
    if (money) caption.append(" (", el("span", currency, { class: "currency" }), ")");
    const field = el("label");
    field.append(caption, input);
    return field;
  });
}

/** Writes the currency beside every money field (it is known once the API answered). */
function showCurrency() {
  for (const node of document.querySelectorAll(".currency")) node.textContent = currency;
}

/**
 * A budget from a form's number fields `names`: a blank field is left out
 * (`blank` undefined) or sent as `blank` (null: no limit).
 */
function budgetFrom(data, names, blank) {
  const budget = {};
  for (const name of names) {
    const value = String(data.get(name) || "").trim();
    if (value) budget[name] = Number(value);
    else if (blank !== undefined) budget[name] = blank;
  }
  return budget;
}

/** A form whose submit runs `action` with it, its errors shown like every action's. */
function onSubmit(form, action) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(() => action(form));
  });
}

/** A managed team's Edit budget (a form in its row) and Delete; a config team has none. */
function teamActionsCell(team) {
  const cell = el("td", null, { class: "team-actions" });
  if (team.source !== "managed") {
    cell.append(el("span", "config file", { class: "muted small" }));
    return cell;
  }
  const box = el("div", null, { class: "actions" });
  const form = el("form", null, { class: "edit-budget", "aria-label": `Budget of ${team.name}` });
  form.hidden = true;
  const names = TEAM_LIMITS.map(([name]) => name);
  form.append(...limitFields(TEAM_LIMITS, team.usage || {}), el("button", "Save", { type: "submit" }));
  const cancel = el("button", "Cancel", { type: "button" });
  cancel.addEventListener("click", () => { form.hidden = true; });
  form.append(cancel, el("span", "Blank: no limit.", { class: "muted small" }));
  onSubmit(form, async () => {
    const budget = budgetFrom(new FormData(form), names, null);
    await api("PATCH", `/admin/teams/${encodeURIComponent(team.name)}`, { budget });
    await loadTeams();
  });
  const edit = actionButton("Edit budget", true, () => { form.hidden = !form.hidden; });
  box.append(edit, deleteButton("teams", team.name, "Its budget is gone."));
  cell.append(box, form);
  return cell;
}

/** The client form's choice of team: none, or one of `teams`, keeping what was chosen. */
function teamChoices(teams) {
  const select = $("create-form").elements.team;
  const chosen = select.value;
  select.replaceChildren(el("option", "(no team)", { value: "" }), ...teams.map((team) => el("option", team.name, { value: team.name })));
  select.value = teams.some((team) => team.name === chosen) ? chosen : "";
}

/**
 * Each table's latest fetch: loads can overlap (the page's refresh and an
 * action's, two quick clicks) and finish out of order, and only the
 * latest may draw, or an older answer would overwrite a newer one.
 */
const fetches = { clients: 0, teams: 0 };

async function loadTeams() {
  const ticket = ++fetches.teams;
  const teams = await api("GET", "/admin/teams");
  if (ticket === fetches.teams) showTeams(teams);
}

function showTeams(list) {
  currency = list.currency || currency;
  showCurrency();
  const body = $("teams-table").tBodies[0];
  body.replaceChildren();
  for (const team of list.data) {
    const row = el("tr", null, { "data-team": team.name });
    const cells = [el("td", team.name, { class: "name" }), sourceCell(team), membersCell(team), budgetCell(team), teamActionsCell(team)];
    ["Name", "Source", "Members", "Budget", "Actions"].forEach((label, i) => i > 0 && cells[i].setAttribute("data-label", label));
    row.append(...cells);
    body.append(row);
  }
  $("teams-table").hidden = list.data.length === 0;
  $("teams-empty").hidden = list.data.length > 0;
  teamChoices(list.data);
}

/**
 * Clients and teams: a change to either changes what the other shows
 * (members, teams). Both are fetched, then both drawn in one go, so the page
 * never shows one table updated and the other not.
 */
async function loadDirectory() {
  const tickets = [++fetches.clients, ++fetches.teams];
  const [clients, teams] = await Promise.all([api("GET", "/admin/clients"), api("GET", "/admin/teams")]);
  if (tickets[0] === fetches.clients) showClients(clients);
  if (tickets[1] === fetches.teams) showTeams(teams);
}

async function createTeam(form) {
  const data = new FormData(form);
  const request = { name: String(data.get("name")).trim() };
  const budget = budgetFrom(data, TEAM_LIMITS.map(([name]) => name));
  if (Object.keys(budget).length) request.budget = budget;
  await api("POST", "/admin/teams", request);
  form.reset();
  await loadTeams();
}

function showKey(name, key) {
  $("new-key-client").textContent = name;
  $("new-key-value").textContent = key;
  $("copy-key").textContent = "Copy";
  $("new-key").hidden = false;
}

function dismissKey() {
  $("new-key").hidden = true;
  $("new-key-client").textContent = "";
  $("new-key-value").textContent = "";
  $("copy-key").textContent = "Copy";
}

async function createClient(form) {
  const data = new FormData(form);
  const request = { name: String(data.get("name")).trim() };
  const models = String(data.get("models") || "").trim();
  if (models) request.models = models.split(",").map((m) => m.trim()).filter(Boolean);
  const budget = budgetFrom(data, CLIENT_LIMITS);
  if (Object.keys(budget).length) request.budget = budget;
  const team = String(data.get("team") || "");
  if (team) request.team = team;
  const answer = await api("POST", "/admin/clients", request);
  form.reset();
  showKey(answer.client.name, answer.key);
  await loadDirectory();
}

// --- spend ------------------------------------------------------------------

const DAY_MS = 86400000;

/** `YYYY-MM-DD` of a date's UTC day: the spend log counts UTC days. */
function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

/** The first and last UTC day of this month. */
function thisMonth() {
  const now = new Date();
  const first = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1));
  const last = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 0));
  return [isoDay(first), isoDay(last)];
}

/** The day after `YYYY-MM-DD`: the API's `until` is exclusive, the form's "To" is not. */
function nextDay(day) {
  return isoDay(new Date(Date.parse(`${day}T00:00:00Z`) + DAY_MS));
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

/** Shortens an SVG text (already in the page) with an ellipsis until it fits `width`. */
function fit(text, width) {
  const full = text.textContent;
  if (text.getComputedTextLength() <= width) return;
  let keep = full.length;
  while (keep > 1 && text.getComputedTextLength() > width) {
    keep -= 1;
    text.textContent = `${full.slice(0, keep)}…`;
  }
}

/** Charts are drawn at their box's width, and again when it changes. */
const charts = new Map();
const resized = new ResizeObserver((entries) => {
  for (const entry of entries) {
    const chart = charts.get(entry.target);
    if (chart && Math.abs(chart.width - entry.contentRect.width) >= 1) draw(entry.target, chart.paint);
  }
});

function draw(container, paint) {
  const width = Math.max(200, Math.floor(container.clientWidth || 480));
  charts.set(container, { width, paint });
  resized.observe(container);
  container.replaceChildren();
  paint(width);
}

/** Horizontal bars: prompt and completion tokens per row, its cost beside them. */
function barChart(container, rows, labelKey, unit) {
  if (!rows.length) {
    charts.delete(container);
    container.replaceChildren();
    return;
  }
  draw(container, (width) => {
    const line = 24;
    const labelWidth = Math.min(160, Math.round(width * 0.32));
    const figures = 150;
    const max = Math.max(1, ...rows.map((r) => r.prompt_tokens + r.completion_tokens));
    const scale = (width - labelWidth - figures) / max;
    const chart = svg("svg", { width, height: rows.length * line + 4, viewBox: `0 0 ${width} ${rows.length * line + 4}`, role: "img", "aria-label": `Tokens by ${labelKey}` });
    container.append(chart, legend());
    rows.forEach((row, i) => {
      const y = i * line + 2;
      const total = row.prompt_tokens + row.completion_tokens;
      const label = svg("text", { x: 0, y: y + 14, class: "axis" }, row[labelKey]);
      chart.append(label);
      fit(label, labelWidth - 8);
      label.append(svg("title", {}, row[labelKey]));
      const prompt = row.prompt_tokens * scale;
      const completion = row.completion_tokens * scale;
      const bars = svg("g");
      bars.append(
        svg("rect", { x: labelWidth, y: y + 2, width: Math.max(prompt, 0.5), height: line - 8, class: "prompt" }),
        svg("rect", { x: labelWidth + prompt, y: y + 2, width: Math.max(completion, 0.5), height: line - 8, class: "completion" }),
        svg("title", {}, `${row[labelKey]}: ${fmt(row.prompt_tokens)} prompt + ${fmt(row.completion_tokens)} completion tokens, ${money(row.cost)} ${unit}`),
      );
      chart.append(bars, svg("text", { x: labelWidth + prompt + completion + 4, y: y + 14, class: "axis cost" }, `${fmt(total)} · ${money(row.cost)} ${unit}`));
    });
  });
}

function legend() {
  const box = el("p", null, { class: "legend" });
  box.append(el("span", "prompt", { class: "key prompt" }), el("span", "completion", { class: "key completion" }));
  return box;
}

const shortDay = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", timeZone: "UTC" });

/** Vertical bars: tokens per UTC day, with the largest day marked on the axis. */
function dayChart(container, days) {
  draw(container, (width) => {
    const height = 150;
    const left = 64;
    const top = 8;
    const max = Math.max(1, ...days.map((d) => d.tokens));
    const barWidth = (width - left) / days.length;
    const chart = svg("svg", { width, height: height + top + 22, viewBox: `0 0 ${width} ${height + top + 22}`, role: "img", "aria-label": "Tokens per day, last 30 days" });
    for (const share of [1, 0.5]) {
      const y = top + height - share * height;
      chart.append(svg("line", { x1: left, x2: width, y1: y, y2: y, class: "grid" }));
      chart.append(svg("text", { x: left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, fmt(Math.round(max * share))));
    }
    chart.append(svg("line", { x1: left, x2: width, y1: top + height, y2: top + height, class: "grid" }));
    const every = Math.ceil(days.length / Math.max(1, Math.floor((width - left) / 64)));
    days.forEach((day, i) => {
      const h = (day.tokens / max) * height;
      const x = left + i * barWidth;
      const date = new Date(`${day.day}T00:00:00Z`);
      const bar = svg("rect", { x: x + 1, y: top + height - h, width: Math.max(barWidth - 2, 1), height: Math.max(h, 0.5), class: "completion" });
      bar.append(svg("title", {}, `${shortDay.format(date)} (UTC): ${fmt(day.tokens)} tokens`));
      chart.append(bar);
      if (i % every === 0) chart.append(svg("text", { x, y: top + height + 16, class: "axis" }, shortDay.format(date)));
    });
    container.append(chart);
  });
}

/** A row's label: a team of none is the clients without one. */
const NO_GROUP = { team: "(no team)", model: "(no model)" };

function spendTable(table, report, key) {
  table.tHead.rows[0].cells[5].textContent = `Cost (${report.currency})`;
  const body = table.tBodies[0];
  body.replaceChildren();
  const number = (n) => el("td", fmt(n), { class: "num" });
  const cells = (row, label) => [el("td", label), number(row.requests), number(row.errors), number(row.prompt_tokens), number(row.completion_tokens), el("td", money(row.cost), { class: "num" })];
  for (const row of report.rows) {
    const tr = el("tr", null, { [`data-${key}`]: row[key] ?? "" });
    tr.append(...cells(row, row[key] ?? NO_GROUP[key] ?? "–"));
    body.append(tr);
  }
  const foot = table.tFoot;
  foot.replaceChildren();
  if (report.rows.length > 1 && report.total) {
    const tr = el("tr");
    tr.append(...cells(report.total, "Total"));
    foot.append(tr);
  }
}

async function loadSpend() {
  const form = $("period");
  const since = form.elements.since.value;
  const to = form.elements.to.value;
  if (!since || !to) throw new Error("Choose both days of the period.");
  const until = nextDay(to);
  const query = (by, from, end) => `/admin/usage?since=${encodeURIComponent(from)}&until=${encodeURIComponent(end)}&by=${by}`;
  const [byClient, byModel, byTeam] = await Promise.all(["client", "model", "team"].map((by) => api("GET", query(by, since, until))));
  const sorted = (report) => ({ rows: [...report.data].sort((a, b) => b.prompt_tokens + b.completion_tokens - (a.prompt_tokens + a.completion_tokens)), total: report.total, currency: report.currency });
  const clients = sorted(byClient);
  const models = sorted(byModel);
  const teams = sorted(byTeam);
  const empty = clients.rows.length === 0;
  $("spend-empty").hidden = !empty;
  $("spend-data").hidden = empty;
  $("spend-total").hidden = empty;
  $("spend-total-cost").textContent = `${money(byClient.total.cost)} ${byClient.currency}`;
  spendTable($("spend-client"), clients, "client");
  spendTable($("spend-model"), models, "model");
  spendTable($("spend-team"), teams, "team");
  barChart($("chart-client"), clients.rows, "client", byClient.currency);
  barChart($("chart-model"), models.rows, "model", byModel.currency);

  const today = new Date();
  const start = new Date(Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate() - 29));
  const end = new Date(start.getTime() + 30 * DAY_MS);
  const byDay = await api("GET", query("day", isoDay(start), isoDay(end)));
  const tokens = new Map(byDay.data.map((row) => [row.day, row.prompt_tokens + row.completion_tokens]));
  const days = [];
  for (let i = 0; i < 30; i++) {
    const day = isoDay(new Date(start.getTime() + i * DAY_MS));
    days.push({ day, tokens: tokens.get(day) || 0 });
  }
  $("days-empty").hidden = byDay.data.length > 0;
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
      state.textContent = row.state === "healthy" ? "healthy" : row.state.replaceAll("_", " ");
    }
    const room = el("td");
    const parts = [];
    for (const [name, window] of Object.entries(row.pacing || {})) {
      if (window.limit !== null && window.limit !== undefined) parts.push(`${name.replaceAll("_", " ")}: ${fmt(window.remaining)} of ${fmt(window.limit)}`);
    }
    if (parts.length) room.textContent = parts.join("; ");
    else room.append(el("span", "no limits", { class: "muted" }));
    tr.append(el("td", row.deployment), el("td", row.models.join(", ")), state, el("td", fmt(row.attempts_5m)), el("td", fmt(row.failures_5m)), room);
    body.append(tr);
  }
  $("upstreams-table").hidden = list.data.length === 0;
  $("upstreams-empty").hidden = list.data.length > 0;
}

async function refresh() {
  await guarded(async () => {
    await Promise.all([loadDirectory(), loadSpend(), loadUpstreams()]);
  });
}

// --- wiring -------------------------------------------------------------------

function start() {
  const [since, to] = thisMonth();
  $("period").elements.since.value = since;
  $("period").elements.to.value = to;
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
  const clientForm = $("create-form");
  clientForm.querySelector("select[name=team]").closest("label").before(...limitFields(COST_LIMITS));
  onSubmit(clientForm, createClient);
  const teamForm = $("team-form");
  teamForm.querySelector("button[type=submit]").before(...limitFields(TEAM_LIMITS));
  onSubmit(teamForm, createTeam);
  $("copy-key").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("new-key-value").textContent);
      $("copy-key").textContent = "Copied";
    } catch {
      // Clipboard refused (no permission, or not a secure context): select
      // the key for a manual copy.
      const range = document.createRange();
      range.selectNodeContents($("new-key-value"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      $("copy-key").textContent = "Selected: press Ctrl+C";
    }
  });
  $("dismiss-key").addEventListener("click", dismissKey);
  if (adminKey) login(adminKey);
}

start();
