// imgflow console: plain JavaScript, no build step, no dependencies.
//
// Everything shown here that comes from the API (plugin names,
// descriptions, parameter descriptions, error messages) is untrusted: it is
// only ever set as text (`textContent`, text nodes, attribute values), never
// as HTML. The page is served with a Content-Security-Policy that allows no
// inline script or style.
//
// Credentials: signing in sends the key or token once to /console/session,
// which keeps it in an HttpOnly, SameSite=Strict session cookie; this script
// never stores it. Every request carries X-Imgflow-Console, which the API
// requires for changes made with that cookie.
"use strict";

const STATUSES = ["queued", "running", "completed", "failed", "cancelled"];
const FINISHED = new Set(["completed", "failed", "cancelled"]);
const MAX_STEPS = 8;
const OVERVIEW_MINUTES = 15;
const OVERVIEW_REFRESH_MS = 3000;

/** What the session is: {role, key_id, auth_required, admin_enabled}. */
let session = { role: "none", auth_required: true, admin_enabled: false };
/** Timers and streams of the page shown, stopped when it changes. */
let cleanups = [];

// ---------------------------------------------------------------- helpers

/** Makes an element: attributes as properties or attributes, children as nodes or text. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "for") el.htmlFor = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

/** An error from the API: its stable code and its message. */
class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  toString() {
    return `${this.code} (${this.status}): ${this.message}`;
  }
}

/** Calls the API; answers its JSON (or null), throws ApiFailure. */
async function api(method, path, options = {}) {
  const headers = Object.assign({ "X-Imgflow-Console": "1" }, options.headers || {});
  let body = options.body;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, credentials: "same-origin" });
  } catch (e) {
    throw new ApiFailure(0, "network", `the API did not answer: ${e.message}`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const err = data && data.error ? data.error : { code: String(response.status), message: text || response.statusText };
    if (response.status === 401 && session.role !== "none" && path !== "/console/session") {
      // The key was revoked or the session ended elsewhere.
      await loadSession();
    }
    throw new ApiFailure(response.status, err.code, err.message);
  }
  return data;
}

function toast(message) {
  const el = document.getElementById("toast");
  el.textContent = message;
  setTimeout(() => { if (el.textContent === message) el.textContent = ""; }, 4000);
}

function errorBox(id) {
  return h("div", { id, class: "error", role: "alert" });
}

function showError(box, err) {
  box.textContent = err instanceof ApiFailure ? `${err.code}: ${err.message}` : String(err);
}

const isAdmin = () => session.role === "admin";
const canUseJobs = () => session.role !== "none";

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms < 1000 ? `${ms.toFixed(ms < 10 ? 1 : 0)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString();
}

function runMs(job) {
  if (!job.started_at || !job.finished_at) return null;
  return new Date(job.finished_at) - new Date(job.started_at);
}

function statusBadge(status) {
  return h("span", { class: `status status-${status}`, "data-status": status }, status);
}

function table(headers, rows, opts = {}) {
  return h("div", { class: "table-wrap" },
    h("table", { class: "responsive", id: opts.id || null },
      opts.caption ? h("caption", { class: "muted" }, opts.caption) : null,
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col", class: t.num ? "num" : null }, t.label || t)))),
      h("tbody", {}, rows)));
}

function cell(label, content, cls) {
  return h("td", { "data-label": label, class: cls || null }, content);
}

/** Plugins by name (active versions), read once per page. */
async function plugins() {
  const data = await api("GET", "/v1/plugins");
  return data.plugins;
}

/** A job's steps as "a → b → c". */
function stepsText(job) {
  const steps = job.steps && job.steps.length ? job.steps : [{ action: job.action }];
  return steps.map((s) => s.action).join(" → ");
}

// ---------------------------------------------------------------- session

async function loadSession() {
  try {
    session = await api("GET", "/console/session");
  } catch (e) {
    session = { role: "none", auth_required: true, admin_enabled: false };
  }
  renderWho();
}

function renderWho() {
  const who = clear(document.getElementById("who"));
  const label = {
    admin: "Signed in as operator (admin token)",
    client: `Signed in with client key ${session.key_id || ""}`,
    anonymous: "Not signed in (this API runs with AUTH_REQUIRED=false)",
    none: "Not signed in",
  }[session.role];
  append(who, [h("span", { id: "role", "data-role": session.role }, label)]);
  if (session.role === "admin" || session.role === "client") {
    who.appendChild(h("button", { type: "button", id: "sign-out", onclick: signOut }, "Sign out"));
  } else if (session.role === "anonymous") {
    who.appendChild(h("a", { href: "#/signin", class: "button" }, "Sign in"));
  }
}

async function signOut() {
  try {
    await api("DELETE", "/console/session");
  } finally {
    await loadSession();
    location.hash = session.role === "none" ? "#/signin" : "#/overview";
    route();
  }
}

function pageSignIn(main) {
  const error = errorBox("signin-error");
  const input = h("input", { type: "password", id: "credential", name: "credential", autocomplete: "off", required: true, "aria-describedby": "credential-hint" });
  const form = h("form", { class: "card signin", id: "signin-form" },
    h("h1", {}, "Sign in"),
    h("p", {}, h("label", { for: "credential" }, "Client key or admin token")),
    h("p", {}, input),
    h("p", { id: "credential-hint", class: "muted" },
      "Kept by this browser until it closes, in a cookie page scripts cannot read. The admin token manages plugins and sees every job; a client key sees its own jobs."),
    error,
    h("p", {}, h("button", { type: "submit", class: "primary" }, "Sign in")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    try {
      session = await api("POST", "/console/session", { json: { credential: input.value } });
      input.value = "";
      renderWho();
      location.hash = "#/overview";
    } catch (e) {
      showError(error, e);
      input.focus();
    }
  });
  main.appendChild(form);
  input.focus();
}

// ---------------------------------------------------------------- usage

/** A limit's value, or what applies without one. */
function limitText(v, unit, none) {
  if (v === null || v === undefined) return none;
  if (v === 0) return "none";
  return `${v} ${unit}`;
}

/** Operators: every key's share of worker time and limits. A client key:
 * its own limits and what it uses of them (GET /v1/usage). */
async function pageUsage(main) {
  main.appendChild(h("h1", {}, isAdmin() ? "Keys: shares and limits" : "Your usage and limits"));
  const error = errorBox("usage-error");
  main.appendChild(error);
  try {
    if (isAdmin()) {
      const data = await api("GET", "/v1/keys");
      const rows = data.keys.map((k) => h("tr", { "data-key": k.id },
        cell("Name", k.name),
        cell("Id", h("code", {}, k.id)),
        cell("Share of worker time", k.share === null || k.share === undefined ? "1 (equal)" : String(k.share), "num"),
        cell("Rate", limitText(k.rate_per_second, "jobs/s", "the default")),
        cell("Burst", limitText(k.rate_burst, "jobs", "the default")),
        cell("Daily quota", limitText(k.daily_megapixels, "MP", "the default"))));
      main.appendChild(table(["Name", "Id", { label: "Share of worker time", num: true }, "Rate", "Burst", "Daily quota"], rows, { id: "keys" }));
      main.appendChild(h("p", { class: "muted" },
        "Set with PUT /v1/keys/{id}/limits. A key of share 2 gets twice the worker time of a key of share 1 while both have jobs waiting."));
    } else {
      const u = await api("GET", "/v1/usage");
      const props = [
        ["Rate", u.rate ? `${u.rate.per_second} jobs/s, burst ${u.rate.burst}; ${u.rate.remaining} now` : "no limit"],
        ["Daily quota", u.quota ? `${u.quota.used} of ${u.quota.megapixels_per_day} MP used today` : "no quota"],
        ["Unfinished jobs", u.unfinished ? `${u.unfinished.jobs} of ${u.unfinished.cap}` : "–"],
      ];
      main.appendChild(h("div", { class: "card", id: "usage" }, h("dl", { class: "props" }, props.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))));
    }
  } catch (e) {
    showError(error, e);
  }
}

// ---------------------------------------------------------------- overview

function pageOverview(main) {
  main.appendChild(h("h1", {}, "Overview"));
  const error = errorBox("overview-error");
  const body = h("div", { id: "overview" });
  append(main, [error, body]);
  const refresh = async () => {
    try {
      const data = await api("GET", `/v1/overview?minutes=${OVERVIEW_MINUTES}`);
      error.textContent = "";
      renderOverview(clear(body), data);
    } catch (e) {
      showError(error, e);
    }
  };
  refresh();
  const timer = setInterval(refresh, OVERVIEW_REFRESH_MS);
  cleanups.push(() => clearInterval(timer));
}

function renderOverview(body, data) {
  const stat = (id, value, label) =>
    h("div", { class: "stat" }, h("div", { class: "value", id }, value), h("div", { class: "label" }, label));
  const totals = data.actions.reduce((t, a) => ({ completed: t.completed + a.completed, failed: t.failed + a.failed }), { completed: 0, failed: 0 });
  body.appendChild(h("div", { class: "stats" },
    stat("ov-queue-depth", data.queue_depth === null ? "?" : String(data.queue_depth), "jobs on the queue"),
    stat("ov-oldest", data.queue_oldest_age_seconds === null ? "?" : `${data.queue_oldest_age_seconds.toFixed(1)} s`, "oldest queued job"),
    stat("ov-workers", String(data.workers_seen), "workers seen (last 60 s)"),
    stat("ov-completed", String(totals.completed), `completed (last ${data.minutes} min)`),
    stat("ov-failed", String(totals.failed), `failed (last ${data.minutes} min)`)));

  // Per action: counts, percentiles, and one bar pair per minute.
  const now = new Date(data.generated_at);
  const minutes = [];
  for (let i = data.minutes - 1; i >= 0; i--) {
    const m = new Date(now.getTime() - i * 60000);
    m.setSeconds(0, 0);
    minutes.push(m.getTime());
  }
  const perMinute = new Map();
  let peak = 1;
  for (const row of data.per_minute) {
    const key = `${row.action}|${new Date(row.minute).getTime()}`;
    perMinute.set(key, row);
    peak = Math.max(peak, row.completed + row.failed);
  }
  const bars = (action) => {
    const box = h("div", { class: "bars", role: "img", "aria-label": `${action}: jobs finished per minute, oldest first` });
    for (const t of minutes) {
      const row = perMinute.get(`${action}|${t}`) || { completed: 0, failed: 0 };
      const pair = h("div", { class: "bar-pair", title: `${new Date(t).toLocaleTimeString()}: ${row.completed} completed, ${row.failed} failed` });
      const ok = h("div", { class: "bar" });
      const bad = h("div", { class: "bar failed" });
      ok.style.height = `${Math.round((row.completed / peak) * 34)}px`;
      bad.style.height = `${Math.round((row.failed / peak) * 34)}px`;
      append(pair, [ok, bad]);
      box.appendChild(pair);
    }
    return box;
  };
  body.appendChild(h("h2", {}, `By action, last ${data.minutes} minutes`));
  if (data.actions.length === 0) {
    body.appendChild(h("p", { class: "muted", id: "ov-no-jobs" }, "No job finished in this window."));
  } else {
    body.appendChild(table(
      ["Action", { label: "Completed", num: true }, { label: "Failed", num: true }, { label: "Cancelled", num: true },
        { label: "p50", num: true }, { label: "p95", num: true }, { label: "p99", num: true }, "Per minute"],
      data.actions.map((a) => h("tr", { "data-action": a.action },
        cell("Action", a.action),
        cell("Completed", String(a.completed), "num completed"),
        cell("Failed", String(a.failed), "num failed"),
        cell("Cancelled", String(a.cancelled), "num"),
        cell("p50", fmtMs(a.p50_ms), "num"),
        cell("p95", fmtMs(a.p95_ms), "num"),
        cell("p99", fmtMs(a.p99_ms), "num"),
        cell("Per minute", bars(a.action)))),
      { id: "ov-actions" }));
  }
  if (data.workers.length) {
    body.appendChild(h("h2", {}, "Workers"));
    body.appendChild(table(["Worker", { label: "Jobs held", num: true }, { label: "Last heartbeat", num: true }],
      data.workers.map((w) => h("tr", {},
        cell("Worker", h("code", {}, w.name)),
        cell("Jobs held", String(w.pending), "num"),
        cell("Last heartbeat", `${w.last_seen_seconds.toFixed(1)} s ago`, "num")))));
  }
  body.appendChild(h("p", { class: "muted" }, `Read ${now.toLocaleTimeString()}; refreshed every ${OVERVIEW_REFRESH_MS / 1000} s. Run times are a worker's start to finish of the last attempt.`));
}

// ---------------------------------------------------------------- plugins

function describeConstraint(p) {
  const a = p.allowed || { type: "any" };
  if (a.type === "within") {
    const lo = a.min === null || a.min === undefined ? "" : `${a.min}${a.min_inclusive ? " ≤" : " <"} `;
    const hi = a.max === null || a.max === undefined ? "" : ` ${a.max_inclusive ? "≤ " : "< "}${a.max}`;
    return `${lo}${p.name}${hi}`;
  }
  if (a.type === "one_of") return `one of ${a.values.join(", ")}`;
  return "";
}

function paramList(params) {
  if (!params || params.length === 0) return h("span", { class: "muted" }, "none");
  return h("ul", {}, params.map((p) => h("li", {},
    h("code", {}, p.name), ` (${p.kind}`, describeConstraint(p) ? `, ${describeConstraint(p)}` : "",
    `, default ${JSON.stringify(p.default)})`, p.description ? ` — ${p.description}` : "")));
}

async function pagePlugins(main) {
  main.appendChild(h("h1", {}, "Plugins"));
  const error = errorBox("plugins-error");
  main.appendChild(error);
  if (isAdmin()) {
    main.appendChild(uploadCard(() => route()));
  } else {
    main.appendChild(h("p", { class: "muted", id: "upload-hint" },
      session.admin_enabled
        ? "Uploading, activating and deleting plugins needs the admin token: sign in with it to manage plugins."
        : "Plugin management is off on this API (no IMGFLOW_ADMIN_TOKEN)."));
  }
  let list;
  try {
    list = await plugins();
  } catch (e) {
    showError(error, e);
    return;
  }
  const rows = list.map((p) => {
    const versionsRow = h("tr", { class: "versions", hidden: true }, h("td", { colspan: "7" }));
    const toggle = h("button", { type: "button", "aria-expanded": "false", "data-plugin": p.name, class: "show-versions" }, "Versions");
    toggle.addEventListener("click", async () => {
      const open = toggle.getAttribute("aria-expanded") === "true";
      toggle.setAttribute("aria-expanded", String(!open));
      versionsRow.hidden = open;
      if (!open) await renderVersions(versionsRow.firstChild, p.name);
    });
    return [
      h("tr", { "data-plugin": p.name },
        cell("Name", [h("strong", { class: "plugin-name" }, p.name), p.builtin ? h("span", { class: "badge builtin" }, "built-in") : null]),
        cell("Version", p.version),
        cell("Description", h("span", { class: "plugin-description" }, p.description)),
        cell("Parameters", paramList(p.params)),
        cell("Digest", h("code", { title: p.digest }, p.digest.slice(0, 12))),
        cell("Size", fmtBytes(p.size), "num"),
        cell("", toggle)),
      versionsRow,
    ];
  });
  main.appendChild(table(["Name", "Version", "Description", "Parameters", "Digest", { label: "Size", num: true }, ""], rows, { id: "plugins" }));
}

async function renderVersions(td, name) {
  clear(td);
  const error = errorBox(null);
  td.appendChild(error);
  let data;
  try {
    data = await api("GET", `/v1/plugins/${encodeURIComponent(name)}`);
  } catch (e) {
    showError(error, e);
    return;
  }
  const rows = data.versions.map((v) => {
    const buttons = [];
    if (isAdmin()) {
      if (!v.active) {
        buttons.push(h("button", { type: "button", class: "activate", "data-version": v.version, onclick: async () => {
          try {
            await api("POST", `/v1/plugins/${encodeURIComponent(name)}/activate`, { json: { version: v.version } });
            toast(`${name} ${v.version} is active`);
            route();
          } catch (e) { showError(error, e); }
        } }, `Activate ${v.version}`));
      }
      if (!v.builtin) {
        buttons.push(h("button", { type: "button", class: "danger delete-version", "data-version": v.version, onclick: async () => {
          if (!confirm(`Delete ${name} ${v.version}?`)) return;
          try {
            await api("DELETE", `/v1/plugins/${encodeURIComponent(name)}/versions/${encodeURIComponent(v.version)}`);
            toast(`${name} ${v.version} deleted`);
            route();
          } catch (e) { showError(error, e); }
        } }, `Delete ${v.version}`));
      }
    }
    return h("tr", { "data-version": v.version },
      cell("Version", [v.version, v.active ? h("span", { class: "badge active" }, "active") : null]),
      cell("Digest", h("code", {}, v.digest.slice(0, 12))),
      cell("Size", fmtBytes(v.size), "num"),
      cell("Uploaded", `${fmtTime(v.created_at)} by ${v.uploader}`),
      cell("", h("div", { class: "actions" }, buttons)));
  });
  td.appendChild(table(["Version", "Digest", { label: "Size", num: true }, "Uploaded", ""], rows, { caption: `Versions of ${name}` }));
  await renderLimits(td, name);
}

/** The fields of a plugin's limits: name, label, unit. */
const LIMIT_FIELDS = [
  ["max_concurrent", "Running at once, all keys", "jobs"],
  ["max_concurrent_per_key", "Running at once, one key", "jobs"],
  ["timeout_ms", "Time limit", "ms"],
  ["memory_mb", "Memory limit", "MiB"],
];

/** A plugin's own limits (every version's); operators may change them. */
async function renderLimits(td, name) {
  const error = errorBox(null);
  let limits;
  try {
    limits = await api("GET", `/v1/plugins/${encodeURIComponent(name)}/limits`);
  } catch (e) {
    td.appendChild(error);
    showError(error, e);
    return;
  }
  const show = (v, unit) => (v === null || v === undefined ? "none of its own" : `${v} ${unit}`);
  const rows = LIMIT_FIELDS.map(([field, label, unit]) =>
    h("tr", { "data-limit": field }, cell("Limit", label), cell("Value", show(limits[field], unit))));
  td.appendChild(table(["Limit", "Value"], rows, { caption: `Limits of ${name}` }));
  if (!isAdmin()) return;
  const inputs = LIMIT_FIELDS.map(([field, label, unit]) => {
    const id = `limit-${name}-${field}`;
    const input = h("input", { type: "number", id, min: "1", step: "1", value: limits[field] ?? "" });
    return [field, input, h("div", { class: "field" }, h("label", { for: id }, `${label} (${unit})`), input)];
  });
  const button = h("button", { type: "submit", class: "primary" }, "Save limits");
  const form = h("form", { class: "card limits-form", "data-plugin": name },
    h("p", { class: "hint" }, "Empty: no limit of its own. A job over a cap waits; time and memory apply within each worker's own."),
    ...inputs.map((i) => i[2]), error, h("div", { class: "actions" }, button));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const json = {};
    for (const [field, input] of inputs) json[field] = input.value === "" ? null : Number(input.value);
    button.disabled = true;
    try {
      await api("PUT", `/v1/plugins/${encodeURIComponent(name)}/limits`, { json });
      toast(`Limits of ${name} saved`);
      route();
    } catch (e) {
      showError(error, e);
    } finally {
      button.disabled = false;
    }
  });
  td.appendChild(form);
}

/** The upload form: drop or pick a .wasm, name it, upload. */
function uploadCard(done) {
  const error = errorBox("upload-error");
  const file = h("input", { type: "file", id: "upload-file", accept: ".wasm,application/wasm" });
  const name = h("input", { type: "text", id: "upload-name", required: true, pattern: "[a-z][a-z0-9_\\-]{0,63}", "aria-describedby": "upload-name-hint" });
  const activate = h("input", { type: "checkbox", id: "upload-activate", checked: true });
  const chosen = h("span", { class: "muted", id: "upload-chosen" }, "No file chosen.");
  const drop = h("label", { class: "drop", id: "upload-drop", for: "upload-file" },
    "Drop a plugin component (.wasm) here, or choose one:", file, chosen);
  let picked = null;
  const pick = (f) => {
    picked = f;
    chosen.textContent = f ? `${f.name} (${fmtBytes(f.size)})` : "No file chosen.";
    if (f && !name.value) name.value = f.name.replace(/\.wasm$/, "").replace(/_/g, "-").toLowerCase();
  };
  file.addEventListener("change", () => pick(file.files[0] || null));
  dropTarget(drop, (f) => pick(f));
  const button = h("button", { type: "submit", class: "primary", id: "upload-button" }, "Upload");
  const form = h("form", { class: "card", id: "upload-form" },
    h("h2", {}, "Upload a plugin"),
    drop,
    h("div", { class: "field" }, h("label", { for: "upload-name" }, "Plugin name"), name,
      h("span", { class: "hint", id: "upload-name-hint" }, "The action jobs will name; the component's metadata must agree.")),
    h("div", { class: "field" }, h("label", { for: "upload-activate" }, "Make it active"), activate),
    error,
    h("div", { class: "actions" }, button));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    if (!picked) { error.textContent = "Choose a .wasm file first."; return; }
    button.disabled = true;
    try {
      const v = await api("PUT", `/v1/plugins/${encodeURIComponent(name.value)}?activate=${activate.checked}`,
        { body: picked, headers: { "Content-Type": "application/wasm" } });
      toast(`Uploaded ${v.name} ${v.version}`);
      done();
    } catch (e) {
      showError(error, e);
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

/** Makes `el` accept a dropped file. */
function dropTarget(el, onFile) {
  el.addEventListener("dragover", (e) => { e.preventDefault(); el.classList.add("over"); });
  el.addEventListener("dragleave", () => el.classList.remove("over"));
  el.addEventListener("drop", (e) => {
    e.preventDefault();
    el.classList.remove("over");
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) onFile(f);
  });
}

// ---------------------------------------------------------------- try a filter

/**
 * The inputs for one plugin's declared parameters: numbers (with a slider
 * when both bounds are known), selects for one-of, checkboxes for booleans,
 * text otherwise; defaults filled in; the browser refuses values outside
 * the declared range before anything is sent.
 */
function paramFields(plugin, prefix) {
  const box = h("div", { class: "params" });
  const readers = [];
  for (const p of plugin.params || []) {
    const id = `${prefix}-${p.name}`;
    const hintId = `${id}-hint`;
    const a = p.allowed || { type: "any" };
    let control;
    let read;
    if (p.kind === "boolean") {
      const input = h("input", { type: "checkbox", id, name: p.name, checked: p.default === true, "aria-describedby": hintId });
      control = input;
      read = () => input.checked;
    } else if (a.type === "one_of") {
      const select = h("select", { id, name: p.name, "aria-describedby": hintId },
        a.values.map((v) => h("option", { value: v, selected: v === p.default }, v)));
      control = select;
      read = () => select.value;
    } else if (p.kind === "integer" || p.kind === "float") {
      const input = h("input", { type: "number", id, name: p.name, required: true, step: p.kind === "integer" ? "1" : "any", "aria-describedby": hintId });
      input.value = String(p.default);
      const bounded = a.type === "within";
      if (bounded && a.min !== null && a.min !== undefined) input.min = String(a.min);
      if (bounded && a.max !== null && a.max !== undefined) input.max = String(a.max);
      // Exclusive bounds are checked here (min/max are inclusive).
      const check = () => {
        const v = Number(input.value);
        let why = "";
        if (bounded && !a.min_inclusive && a.min !== null && a.min !== undefined && v <= a.min) why = `${p.name} must be greater than ${a.min}`;
        if (bounded && !a.max_inclusive && a.max !== null && a.max !== undefined && v >= a.max) why = `${p.name} must be less than ${a.max}`;
        input.setCustomValidity(why);
      };
      input.addEventListener("input", check);
      check();
      const parts = [input];
      if (bounded && a.min !== null && a.min !== undefined && a.max !== null && a.max !== undefined) {
        const slider = h("input", { type: "range", id: `${id}-slider`, min: String(a.min), max: String(a.max),
          step: p.kind === "integer" ? "1" : String((a.max - a.min) / 200), "aria-label": `${p.name} slider` });
        slider.value = String(p.default);
        slider.addEventListener("input", () => { input.value = slider.value; check(); });
        input.addEventListener("input", () => { slider.value = input.value; });
        parts.unshift(slider);
      }
      control = h("div", { class: "control" }, parts);
      read = () => (p.kind === "integer" ? parseInt(input.value, 10) : Number(input.value));
    } else {
      const input = h("input", { type: "text", id, name: p.name, "aria-describedby": hintId });
      input.value = p.default === null || p.default === undefined ? "" : String(p.default);
      control = input;
      read = () => input.value;
    }
    const constraint = describeConstraint(p);
    box.appendChild(h("div", { class: "field", "data-param": p.name },
      h("label", { for: id }, p.name),
      control,
      h("span", { class: "hint", id: hintId }, [p.kind, constraint ? `, ${constraint}` : "", `, default ${JSON.stringify(p.default)}`, p.description ? ` — ${p.description}` : ""].join(""))));
    readers.push([p.name, read]);
  }
  if (readers.length === 0) box.appendChild(h("p", { class: "muted" }, "This plugin has no parameters."));
  return { box, values: () => Object.fromEntries(readers.map(([n, r]) => [n, r()])) };
}

async function pageTry(main) {
  main.appendChild(h("h1", {}, "Try a filter"));
  const error = errorBox("try-error");
  let list;
  try {
    list = await plugins();
  } catch (e) {
    showError(error, e);
    main.appendChild(error);
    return;
  }
  const byName = new Map(list.map((p) => [p.name, p]));
  const wanted = new URLSearchParams(location.hash.split("?")[1] || "").get("plugin");

  // The image.
  const file = h("input", { type: "file", id: "try-file", accept: "image/png,image/jpeg,image/webp,image/gif" });
  const chosen = h("span", { class: "muted", id: "try-chosen" }, "No image chosen.");
  const drop = h("label", { class: "drop", id: "try-drop", for: "try-file" }, "Drop an image here (PNG, JPEG, WebP or GIF), or choose one:", file, chosen);
  const before = h("img", { id: "try-before", alt: "The input image", hidden: true });
  let image = null;
  const pick = (f) => {
    image = f;
    chosen.textContent = f ? `${f.name} (${fmtBytes(f.size)})` : "No image chosen.";
    if (before.src) URL.revokeObjectURL(before.src);
    if (f) { before.src = URL.createObjectURL(f); before.hidden = false; }
  };
  file.addEventListener("change", () => pick(file.files[0] || null));
  dropTarget(drop, pick);

  // The steps, each with its generated form.
  const stepsBox = h("div", { id: "try-steps" });
  const steps = [];
  let counter = 0;
  const renumber = () => steps.forEach((s, i) => {
    s.legend.textContent = `Step ${i + 1}`;
    s.remove.hidden = steps.length === 1;
  });
  const addStep = (name) => {
    if (steps.length >= MAX_STEPS) return;
    const n = ++counter;
    const select = h("select", { id: `step${n}-plugin`, class: "step-plugin" },
      list.map((p) => h("option", { value: p.name, selected: p.name === name }, `${p.name} ${p.version}`)));
    const paramsBox = h("div", {});
    const legend = h("legend", {});
    const remove = h("button", { type: "button", class: "danger" }, "Remove step");
    const step = { select, legend, remove, fields: null };
    const fieldset = h("fieldset", { class: "step" }, legend,
      h("div", { class: "field" }, h("label", { for: `step${n}-plugin` }, "Plugin"), select),
      paramsBox, h("div", { class: "actions" }, remove));
    const render = () => {
      step.fields = paramFields(byName.get(select.value), `step${n}`);
      clear(paramsBox).appendChild(step.fields.box);
    };
    select.addEventListener("change", render);
    remove.addEventListener("click", () => {
      steps.splice(steps.indexOf(step), 1);
      fieldset.remove();
      renumber();
    });
    render();
    steps.push(step);
    stepsBox.appendChild(fieldset);
    renumber();
  };
  addStep(byName.has(wanted) ? wanted : (byName.has("blur") ? "blur" : list[0] && list[0].name));

  const addButton = h("button", { type: "button", id: "try-add-step" }, "Add a step (pipeline)");
  addButton.addEventListener("click", () => addStep(list[0].name));
  const format = h("select", { id: "try-format" },
    h("option", { value: "" }, "same as the input"),
    ["png", "jpeg", "webp", "gif"].map((f) => h("option", { value: f }, f)));
  const run = h("button", { type: "submit", class: "primary", id: "try-run" }, "Run");
  const status = h("p", { id: "try-status", "aria-live": "polite" });
  const after = h("img", { id: "try-after", alt: "The result image", hidden: true });
  const download = h("a", { id: "try-download", class: "button", hidden: true, download: "" }, "Download the result");
  const jobLink = h("a", { id: "try-job-link", hidden: true }, "Open the job");

  const form = h("form", { class: "card", id: "try-form", novalidate: true },
    drop, stepsBox,
    h("div", { class: "actions" }, addButton),
    h("div", { class: "field" }, h("label", { for: "try-format" }, "Output format"), format),
    error,
    h("div", { class: "actions" }, run));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    if (!image) { error.textContent = "Choose an image first."; return; }
    // The browser's own checks (declared ranges, exclusive bounds): nothing is sent while one fails.
    const bad = Array.from(form.querySelectorAll("input, select")).find((el) => !el.checkValidity());
    if (bad) {
      error.textContent = `${bad.name || bad.id}: ${bad.validationMessage}`;
      bad.focus();
      return;
    }
    const body = new FormData();
    body.append("image", image);
    if (steps.length === 1) {
      body.append("action", steps[0].select.value);
      body.append("params", JSON.stringify(steps[0].fields.values()));
    } else {
      body.append("steps", JSON.stringify(steps.map((s) => ({ action: s.select.value, params: s.fields.values() }))));
    }
    if (format.value) body.append("format", format.value);
    run.disabled = true;
    after.hidden = true;
    download.hidden = true;
    try {
      const job = await api("POST", "/v1/jobs", { body });
      jobLink.href = `#/jobs/${job.id}`;
      jobLink.hidden = false;
      showStatus(status, job);
      watchJob(job, (j) => {
        showStatus(status, j);
        if (j.status === "completed") {
          after.src = j.result_url;
          after.hidden = false;
          download.href = j.result_url;
          download.hidden = false;
        }
        if (FINISHED.has(j.status)) run.disabled = false;
      });
    } catch (e) {
      showError(error, e);
      run.disabled = false;
    }
  });

  append(main, [form,
    h("section", { class: "card", "aria-labelledby": "try-result-heading" },
      h("h2", { id: "try-result-heading" }, "Result"),
      status,
      h("div", { class: "compare" },
        h("figure", {}, h("figcaption", {}, "Before"), before),
        h("figure", {}, h("figcaption", {}, "After"), after)),
      h("div", { class: "actions" }, download, jobLink))]);
}

function showStatus(el, job) {
  clear(el);
  append(el, ["Job ", h("code", {}, job.id), " is ", statusBadge(job.status)]);
  if (job.status === "completed") {
    const ms = runMs(job);
    if (ms !== null) append(el, [` in ${fmtMs(ms)}`]);
  }
  if (job.error) {
    append(el, [" — ", h("code", { class: "job-error-code" }, job.error.code), ": ", h("span", { class: "job-error-message" }, job.error.message)]);
  }
}

/** Calls `onChange` with the job at each status change, from its event stream, until it finishes. */
function watchJob(job, onChange) {
  if (FINISHED.has(job.status)) { onChange(job); return; }
  const source = new EventSource(`/v1/jobs/${job.id}/events`);
  const stop = () => source.close();
  cleanups.push(stop);
  const handle = (event) => {
    let j;
    try { j = JSON.parse(event.data); } catch (_) { return; }
    onChange(j);
    if (FINISHED.has(j.status)) stop();
  };
  for (const s of STATUSES) source.addEventListener(s, handle);
  source.addEventListener("deleted", stop);
  source.onerror = () => {
    // The stream ended (MAX_WAIT) or broke: read the job once more.
    stop();
    api("GET", `/v1/jobs/${job.id}?wait=30s`).then((j) => {
      onChange(j);
      if (!FINISHED.has(j.status)) watchJob(j, onChange);
    }).catch(() => {});
  };
}

// ---------------------------------------------------------------- jobs

async function pageJobs(main, query) {
  main.appendChild(h("h1", {}, "Jobs"));
  const error = errorBox("jobs-error");
  const status = h("select", { id: "jobs-status", name: "status" },
    h("option", { value: "" }, "any"), STATUSES.map((s) => h("option", { value: s, selected: s === query.get("status") }, s)));
  const action = h("select", { id: "jobs-action", name: "action" }, h("option", { value: "" }, "any"));
  try {
    for (const p of await plugins()) action.appendChild(h("option", { value: p.name, selected: p.name === query.get("action") }, p.name));
  } catch (_) { /* the filter still works by hand */ }
  const filters = h("form", { class: "filters", id: "jobs-filters" },
    h("div", {}, h("label", { for: "jobs-status" }, "Status"), status),
    h("div", {}, h("label", { for: "jobs-action" }, "Action"), action),
    h("div", {}, h("button", { type: "submit" }, "Filter")));
  filters.addEventListener("submit", (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    if (status.value) q.set("status", status.value);
    if (action.value) q.set("action", action.value);
    location.hash = `#/jobs?${q}`;
  });
  append(main, [filters, error]);
  const q = new URLSearchParams();
  for (const k of ["status", "action", "cursor"]) if (query.get(k)) q.set(k, query.get(k));
  q.set("limit", "20");
  let data;
  try {
    data = await api("GET", `/v1/jobs?${q}`);
  } catch (e) {
    showError(error, e);
    return;
  }
  if (data.jobs.length === 0) {
    main.appendChild(h("p", { class: "muted", id: "jobs-empty" }, "No jobs match."));
  } else {
    main.appendChild(table(["Job", "Action", "Status", "Created", { label: "Run time", num: true }, "Error"],
      data.jobs.map((j) => h("tr", { "data-job": j.id },
        cell("Job", h("a", { href: `#/jobs/${j.id}` }, h("code", {}, j.id))),
        cell("Action", stepsText(j)),
        cell("Status", statusBadge(j.status)),
        cell("Created", fmtTime(j.created_at)),
        cell("Run time", fmtMs(runMs(j)), "num"),
        cell("Error", j.error ? h("code", {}, j.error.code) : ""))),
      { id: "jobs" }));
  }
  // Paging: older by the API's cursor; newer by the cursors of the pages
  // before, kept in the address ("first" for the first page).
  const trail = (query.get("trail") || "").split(",").filter(Boolean);
  const link = (cursor, newTrail, label, id) => {
    const p = new URLSearchParams();
    if (query.get("status")) p.set("status", query.get("status"));
    if (query.get("action")) p.set("action", query.get("action"));
    if (cursor && cursor !== "first") p.set("cursor", cursor);
    if (newTrail.length) p.set("trail", newTrail.join(","));
    return h("a", { class: "button", href: `#/jobs?${p}`, id }, label);
  };
  const nav = h("nav", { class: "actions", "aria-label": "Pages of jobs" });
  if (trail.length) nav.appendChild(link(trail[trail.length - 1], trail.slice(0, -1), "← Newer", "jobs-newer"));
  if (data.next_cursor) nav.appendChild(link(data.next_cursor, [...trail, query.get("cursor") || "first"], "Older →", "jobs-older"));
  main.appendChild(nav);
}

async function pageJob(main, id) {
  const error = errorBox("job-error");
  main.appendChild(h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")));
  const box = h("div", { id: "job" });
  append(main, [error, box]);
  let job;
  try {
    job = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`);
  } catch (e) {
    showError(error, e);
    return;
  }
  if (!box.isConnected) return; // the reader moved on meanwhile
  const render = (j) => renderJob(clear(box), j, error);
  render(job);
  watchJob(job, render);
}

function renderJob(box, job, error) {
  box.appendChild(h("h1", {}, "Job ", h("code", {}, job.id)));
  const props = [
    ["Status", statusBadge(job.status)],
    ["Action", stepsText(job)],
    ["Plugin version", job.plugin_version],
    ["Attempts", String(job.attempts)],
    ["Created", fmtTime(job.created_at)],
    ["Started", fmtTime(job.started_at)],
    ["Finished", fmtTime(job.finished_at)],
    ["Run time", fmtMs(runMs(job))],
    ["Output", `${job.output_format}${job.output_quality ? ` at quality ${job.output_quality}` : ""}`],
  ];
  if (job.error) {
    props.push(["Error code", h("code", { id: "job-error-code" }, job.error.code)]);
    props.push(["Error message", h("span", { id: "job-error-message" }, job.error.message)]);
  }
  if (job.retry_of) props.push(["Retry of", h("a", { href: `#/jobs/${job.retry_of}` }, job.retry_of)]);
  if (job.cached_from) props.push(["Result reused from", h("a", { href: `#/jobs/${job.cached_from}` }, job.cached_from)]);
  if (job.batch_id) props.push(["Batch", h("code", {}, job.batch_id)]);
  if (job.callback_url) props.push(["Callback", `${job.callback_url} (${job.callback_status || "not yet"})`]);
  box.appendChild(h("div", { class: "card" }, h("dl", { class: "props" }, props.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))));

  const buttons = [];
  const act = (label, cls, run) => h("button", { type: "button", class: cls, id: `job-${label.toLowerCase()}`, onclick: async () => {
    error.textContent = "";
    try { await run(); } catch (e) { showError(error, e); }
  } }, label);
  if (!FINISHED.has(job.status)) {
    buttons.push(act("Cancel", "", async () => { await api("POST", `/v1/jobs/${job.id}/cancel`); toast("Cancelled"); route(); }));
  }
  if (job.status === "failed" || job.status === "cancelled") {
    buttons.push(act("Retry", "", async () => {
      const j = await api("POST", `/v1/jobs/${job.id}/retry`);
      location.hash = `#/jobs/${j.id}`;
    }));
  }
  buttons.push(act("Delete", "danger", async () => {
    if (!confirm(`Delete job ${job.id} and its images?`)) return;
    await api("DELETE", `/v1/jobs/${job.id}`);
    toast("Deleted");
    location.hash = "#/jobs";
  }));
  if (job.result_url) buttons.push(h("a", { class: "button", href: job.result_url, download: "", id: "job-download" }, "Download the result"));
  box.appendChild(h("div", { class: "actions" }, buttons));

  box.appendChild(h("h2", {}, "Steps"));
  const steps = job.steps && job.steps.length ? job.steps : [{ action: job.action, version: job.plugin_version, params: job.params, run_ms: null }];
  box.appendChild(table(["#", "Plugin", "Version", "Parameters", { label: "Plugin time", num: true }],
    steps.map((s, i) => h("tr", {},
      cell("#", String(i + 1)),
      cell("Plugin", s.action),
      cell("Version", s.version),
      cell("Parameters", h("pre", {}, JSON.stringify(s.params, null, 1))),
      cell("Plugin time", fmtMs(s.run_ms), "num"))),
    { id: "job-steps" }));

  box.appendChild(h("h2", {}, "Images"));
  box.appendChild(h("div", { class: "compare" },
    h("figure", {}, h("figcaption", {}, "Input"), h("img", { id: "job-input", alt: "The job's input image", src: `/v1/jobs/${job.id}/input` })),
    h("figure", {}, h("figcaption", {}, "Result"),
      job.result_url ? h("img", { id: "job-result", alt: "The job's result image", src: job.result_url }) : h("p", { class: "muted" }, job.status === "failed" ? "No result: the job failed." : "No result yet."))));
}

// ---------------------------------------------------------------- routing

const PAGES = {
  overview: pageOverview,
  plugins: pagePlugins,
  try: pageTry,
  jobs: pageJobs,
  usage: pageUsage,
};

async function route() {
  for (const stop of cleanups.splice(0)) stop();
  // Each page renders into its own element: what a page still loading adds
  // after the reader moved on goes into a detached element, not the new page.
  const main = document.createElement("div");
  clear(document.getElementById("main")).appendChild(main);
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, rawQuery] = hash.split("?");
  const parts = path.split("/").filter(Boolean);
  const query = new URLSearchParams(rawQuery || "");
  let section = parts[0] || "overview";
  if (session.role === "none" && session.auth_required) section = "signin";
  for (const a of document.querySelectorAll("nav a[data-section]")) {
    if (a.dataset.section === section) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (section === "signin") { pageSignIn(main); document.title = "Sign in · imgflow"; return; }
  document.title = `${section[0].toUpperCase()}${section.slice(1)} · imgflow`;
  if (section === "jobs" && parts[1]) { await pageJob(main, parts[1]); return; }
  const page = PAGES[section];
  if (!page) { main.appendChild(h("p", {}, "No such page. ", h("a", { href: "#/overview" }, "Go to the overview."))); return; }
  if (!canUseJobs() && section !== "plugins") { pageSignIn(main); return; }
  await page(main, query);
}

window.addEventListener("hashchange", async () => {
  await route();
  // A new page: keyboard and screen-reader users start at its content.
  const main = document.getElementById("main");
  if (!main.contains(document.activeElement)) main.focus({ preventScroll: true });
});
window.addEventListener("DOMContentLoaded", async () => {
  await loadSession();
  await route();
});
