// amqprpc dashboard: renders the snapshots the server pushes (server-sent events, /api/events)
// and carries out dead-letter actions (confirmed in the page, one action id per confirmation,
// CSRF token from the page's meta tag). Every value from the server is escaped before display.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const history = {};          // queue name -> last 60 ready counts (the sparkline)
let last = null;             // the latest snapshot
let browsing = null;         // the service whose dead letters are shown

function esc(value) {
  return String(value === null || value === undefined ? "" : value).replace(/[&<>"']/g,
    (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function num(value) { return value === null || value === undefined ? "—" : esc(value); }
function rate(value) { return value === null || value === undefined ? "—" : Number(value).toFixed(1); }
function ms(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  return seconds < 1 ? (seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1) + " ms" : seconds.toFixed(2) + " s";
}
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return seconds.toFixed(0) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + Math.floor(seconds % 60) + " s";
  return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
}
function actionId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// --- sections --------------------------------------------------------------------------
function show() {
  const wanted = (location.hash || "#services").slice(1);
  document.body.classList.toggle("show-all", wanted === "all");
  document.querySelectorAll(".page").forEach((page) => page.classList.toggle("visible", page.id === wanted));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.section === wanted));
}
window.addEventListener("hashchange", show);

function renderServices(services) {
  if (!services.length) {
    document.getElementById("services-body").innerHTML = '<p class="muted">no service has registered yet</p>';
    return;
  }
  document.getElementById("services-body").innerHTML = services.map((service) => `
    <div class="card" data-service="${esc(service.name)}"><h3>${esc(service.name)}
      <span class="badge ${service.live ? "ok" : "bad"}">${service.live} live</span></h3>
      <table class="grid"><thead><tr><th>Instance</th><th>Host</th><th class="num">PID</th><th>Version</th>
        <th class="num">Uptime</th><th class="num">Concurrency</th><th class="num">Last heartbeat</th>
        <th class="num">Processed</th><th class="num">Failed</th><th>State</th></tr></thead><tbody>
      ${service.instances.map((i) => `<tr class="${i.stale ? "stale" : ""}" data-instance="${esc(i.instance_id)}">
        <td>${esc(i.instance_id)}</td><td>${esc(i.host)}</td><td class="num">${num(i.pid)}</td>
        <td>${esc(i.version)}</td><td class="num">${duration(i.uptime)}</td><td class="num">${num(i.concurrency)}</td>
        <td class="num">${i.heartbeat_age.toFixed(1)} s ago</td>
        <td class="num">${(i.stats.succeeded || 0) + (i.stats.failed || 0)}</td><td class="num">${i.stats.failed || 0}</td>
        <td><span class="badge ${i.stale ? "stale" : "ok"}">${i.stale ? "stale" : "live"}</span></td></tr>`).join("")
        || '<tr><td colspan="10" class="muted">no instance: every worker stopped</td></tr>'}
      </tbody></table></div>`).join("");
}

function spark(name, ready) {
  const points = (history[name] = (history[name] || []).concat([ready || 0]).slice(-60));
  const top = Math.max(1, ...points);
  const coords = points.map((v, i) => `${(i * 140 / 59).toFixed(1)},${(22 - v * 20 / top).toFixed(1)}`).join(" ");
  return `<svg class="spark" viewBox="0 0 140 24"><polyline points="${coords}"/></svg>`;
}

function renderQueues(queues, source) {
  document.getElementById("queue-source").textContent =
    source === "management" ? "from the management API" : "from passive declares (unacked and rates need --management-url)";
  document.getElementById("queues-body").innerHTML = queues.map((q) => `<tr data-queue="${esc(q.name)}">
    <td>${esc(q.service)}</td><td>${esc(q.name)}</td><td>${esc(q.kind)}</td>
    <td class="num ready">${num(q.ready)}</td><td class="num">${num(q.unacked)}</td><td class="num">${num(q.consumers)}</td>
    <td class="num">${rate(q.publish_rate)}</td><td class="num">${rate(q.deliver_rate)}</td>
    <td>${spark(q.name, q.ready)}</td></tr>`).join("") || '<tr><td colspan="9" class="muted">no queues</td></tr>';
}

function renderActions(actions) {
  document.getElementById("actions-body").innerHTML = actions.map((a) => `<tr>
    <td>${esc(a.service)}</td><td>${esc(a.action)}</td><td class="num">${a.succeeded}</td>
    <td class="num">${a.failed}</td><td class="num">${a.retried}</td><td class="num">${a.dead_lettered}</td>
    <td class="num">${a.expired}</td><td class="num">${ms(a.p50)}</td><td class="num">${ms(a.p95)}</td></tr>`).join("")
    || '<tr><td colspan="9" class="muted">no action ran yet</td></tr>';
}

function renderBreakers(breakers) {
  document.getElementById("breakers-body").innerHTML = breakers.map((b) => `<tr data-breaker="${esc(b.name)}">
    <td>${esc(b.name)}</td><td><span class="badge ${esc(b.state)}">${esc(b.state.replace("_", "-"))}</span></td>
    <td class="num">${b.failures}</td><td class="num">${b.open_for === null ? "—" : duration(b.open_for)}</td></tr>`).join("")
    || '<tr><td colspan="4" class="muted">no breaker has recorded anything in Redis</td></tr>';
}

function renderSchedules(schedules) {
  const section = document.getElementById("schedules");
  if (!Array.isArray(schedules)) return;
  section.classList.remove("hidden");
  document.getElementById("schedules-body").innerHTML = schedules.map((s) => `<tr><td>${esc(s.name)}</td>
    <td>${esc(s.service)}</td><td>${esc(s.action)}</td><td>${esc(s.next_run)}</td></tr>`).join("");
}

function renderDeadCounts(dead) {
  const names = Object.keys(dead).sort();
  const total = names.reduce((sum, name) => sum + (dead[name] || 0), 0);
  document.getElementById("dead-total").textContent = total ? String(total) : "";
  document.getElementById("dead-services").innerHTML = names.length ? `<table class="grid"><thead><tr><th>Service</th>
    <th class="num">Dead letters</th><th></th></tr></thead><tbody>${names.map((name) => `<tr data-dead="${esc(name)}">
      <td>${esc(name)}</td><td class="num">${dead[name]}</td><td>
      <button data-do="browse" data-service="${esc(name)}">Browse</button>
      <button data-do="replay-all" data-service="${esc(name)}" ${dead[name] ? "" : "disabled"}>Replay all</button>
      <button class="danger" data-do="purge" data-service="${esc(name)}" ${dead[name] ? "" : "disabled"}>Purge</button>
      </td></tr>`).join("")}</tbody></table>` : '<p class="muted">no dead-letter queue yet</p>';
}

function render(snapshot) {
  last = snapshot;
  renderServices(snapshot.services);
  renderQueues(snapshot.queues, snapshot.queue_source);
  renderActions(snapshot.actions);
  renderBreakers(snapshot.breakers);
  renderSchedules(snapshot.schedules);
  renderDeadCounts(snapshot.dead_letters);
  const problems = Object.entries(snapshot.errors || {});
  const box = document.getElementById("errors");
  box.classList.toggle("hidden", !problems.length);
  box.innerHTML = problems.map(([what, why]) => `<div><b>${esc(what)}</b> unreachable: ${esc(why)}</div>`).join("");
  document.getElementById("updated").textContent = new Date(snapshot.at * 1000).toLocaleTimeString();
}

// --- dead letters ------------------------------------------------------------------------
async function browse(service) {
  browsing = service;
  const box = document.getElementById("dead-browser");
  box.innerHTML = '<p class="muted">loading…</p>';
  let answer, data;
  try {
    answer = await fetch(`/api/dead-letters/${encodeURIComponent(service)}?limit=20`, {credentials: "same-origin"});
    data = await answer.json();
  } catch (error) {
    box.innerHTML = `<p class="result bad">cannot load the dead letters: ${esc(error)}</p>`;
    return;
  }
  if (!answer.ok) { box.innerHTML = `<p class="result bad">${esc(data.detail)}</p>`; return; }
  box.innerHTML = `<h3>${esc(data.queue)}: ${data.count} dead letter(s)${data.count > data.messages.length ?
    `, the first ${data.messages.length} shown` : ""}</h3>
    <table class="grid" id="letters"><thead><tr><th>Message</th><th>Action</th><th>Error</th><th class="num">Attempts</th>
    <th>Last failure</th><th>Body and headers</th><th></th></tr></thead><tbody>
    ${data.messages.map((m) => `<tr data-message="${esc(m.message_id)}"><td>${esc(m.message_id)}</td><td>${esc(m.action)}</td>
      <td><b>${esc(m.error_type)}</b>: ${esc(m.error)}</td><td class="num">${num(m.attempts)}</td>
      <td>${esc(m.last_failure)}</td><td><pre>${esc(m.body_preview)}</pre>
      <details><summary>headers</summary><pre>${esc(JSON.stringify(m.headers, null, 2))}</pre></details></td>
      <td><button data-do="replay-one" data-service="${esc(service)}" data-message="${esc(m.message_id)}">Replay</button>
      </td></tr>`).join("") || '<tr><td colspan="7" class="muted">empty</td></tr>'}</tbody></table>`;
}

const VERBS = {"replay-one": "Replay message", "replay-all": "Replay every dead letter of", "purge": "Delete every dead letter of"};

function askFirst(button) {
  // The confirmation lives in the page (no window.confirm): one action id per confirmation,
  // so a double click or a resubmission is recognised by the server and done once.
  const what = button.dataset.do, service = button.dataset.service, message = button.dataset.message;
  const id = actionId();
  const bar = document.createElement("span");
  bar.className = "confirm";
  bar.innerHTML = `${esc(VERBS[what])} <b>${esc(message || service)}</b>? <button class="primary" data-confirm="${id}">Confirm</button>
    <button data-cancel="1">Cancel</button>`;
  button.replaceWith(bar);
  bar.querySelector("[data-cancel]").onclick = () => bar.replaceWith(button);
  const confirm = bar.querySelector("[data-confirm]");
  confirm.onclick = async () => {
    confirm.disabled = true;
    const path = what === "purge" ? "purge" : "replay";
    const body = {action_id: id};
    if (message) body.message_id = message;
    const answer = await fetch(`/api/dead-letters/${encodeURIComponent(service)}/${path}`, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": CSRF}, body: JSON.stringify(body)});
    const data = await answer.json().catch(() => ({}));
    const result = document.getElementById("action-result");
    result.classList.remove("hidden");
    result.classList.toggle("bad", !answer.ok);
    result.textContent = answer.ok ? describeResult(what, service, data) : `failed: ${data.detail || data.error || answer.status}`;
    bar.replaceWith(button);
    loadRecent();
    if (browsing === service) browse(service);
  };
}

function describeResult(what, service, data) {
  if (data.purged !== undefined) return `purged ${data.purged} dead letter(s) of ${service}`;
  return `replayed ${data.replayed} dead letter(s) of ${service}` + (data.unroutable ? `, ${data.unroutable} unroutable (kept)` : "")
    + (data.duplicate ? " (already done)" : "");
}

async function loadRecent() {
  const answer = await fetch("/api/recent-actions", {credentials: "same-origin"});
  if (!answer.ok) return;
  const recent = await answer.json();
  document.getElementById("recent-body").innerHTML = recent.map((r) => `<tr><td>${new Date(r.at * 1000).toLocaleTimeString()}</td>
    <td>${esc(r.who)}</td><td>${esc(r.what)}</td><td>${esc(r.service)}</td><td>${esc(r.message_id || "all")}</td>
    <td>${r.ok ? esc(JSON.stringify(Object.fromEntries(Object.entries(r).filter(([k]) => ["replayed", "unroutable", "purged"].includes(k))))) : esc(r.error)}</td></tr>`).join("")
    || '<tr><td colspan="6" class="muted">none yet</td></tr>';
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-do]");
  if (!button) return;
  if (button.dataset.do === "browse") browse(button.dataset.service);
  else askFirst(button);
});

// --- the stream --------------------------------------------------------------------------
function connect() {
  const status = document.getElementById("status");
  const source = new EventSource("/api/events", {withCredentials: true});
  source.addEventListener("snapshot", (event) => {
    status.className = "status live";
    status.textContent = "live";
    render(JSON.parse(event.data));
  });
  source.onerror = () => {
    status.className = "status down";
    status.textContent = "reconnecting…";
  };
}

show();
connect();
loadRecent();
