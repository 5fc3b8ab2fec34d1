// The learner page: pick a template, watch it boot, then a terminal tab per VM.
// The session token stays in this tab's memory; URLs only ever carry one-time tickets.
"use strict";

const state = { session: null, token: null, lastEventId: null, events: null, heartbeat: null };
const $ = (id) => document.getElementById(id);

function say(text) { $("status").textContent = text; }

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const payload = response.status === 204 ? null : await response.json();
  if (!response.ok) throw new Error(payload?.detail || `HTTP ${response.status}`);
  return payload;
}

async function ticket() {
  return (await api("POST", `/v1/sessions/${state.session.id}/tickets`)).ticket;
}

async function loadTemplates() {
  const response = await fetch("/ui/dev/templates");
  if (!response.ok) { say("This page needs `labvirt dev` (make run)."); return; }
  const { templates } = await response.json();
  for (const template of templates) {
    const button = document.createElement("button");
    button.className = "template";
    button.dataset.template = template.name;
    const vms = template.vms.map((vm) => vm.hostname).join(", ");
    button.innerHTML = "<strong></strong><span></span>";
    button.querySelector("strong").textContent = template.name;
    button.querySelector("span").textContent = `${template.description} (${vms})`;
    button.addEventListener("click", () => start(template.name).catch((error) => {
      say(`Could not start ${template.name}: ${error.message}`);
      $("progress").hidden = true;
      $("picker").hidden = false;
    }));
    $("templates").append(button);
  }
}

async function start(template) {
  say(`Starting ${template}…`);
  $("picker").hidden = true;
  $("progress").hidden = false;
  const response = await fetch("/ui/dev/sessions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ template }),
  });
  const session = await response.json().catch(() => null);
  if (!response.ok) {
    // Back to the picker, to try again or pick another.
    say(session?.detail || `Could not start ${template} (HTTP ${response.status}).`);
    $("progress").hidden = true;
    $("picker").hidden = false;
    return;
  }
  state.session = session;
  state.token = session.token;
  state.heartbeat = setInterval(() => api("POST", `/v1/sessions/${session.id}/heartbeat`)
    .catch(() => {}), 30000);
  follow();
}

function stage(name, detail) {
  // One item per stage: a repeated stage ("booting 1/2", then "booting 2/2") updates its item.
  let item = $("stages").querySelector(`li[data-stage="${name}"]`);
  if (!item) {
    item = document.createElement("li");
    item.dataset.stage = name;
    $("stages").append(item);
  }
  item.className = name === "failed" ? "failed" : "done";
  const extra = name === "booting" ? ` ${detail.ready}/${detail.total} VMs up`
    : detail.reason ? `: ${detail.reason}` : "";
  item.textContent = `${name}${extra}`;
}

async function follow() {
  const query = new URLSearchParams({ ticket: await ticket() });
  if (state.lastEventId) query.set("last_event_id", state.lastEventId);
  const events = new EventSource(`/v1/sessions/${state.session.id}/events?${query}`);
  state.events = events;
  const on = (name, handler) => events.addEventListener(name, (message) => {
    state.lastEventId = message.lastEventId;
    handler(JSON.parse(message.data));
  });
  for (const name of ["queued", "creating", "booting", "expiring-soon"]) {
    on(name, (detail) => { stage(name, detail); say(`${name}…`); });
  }
  on("ready", async (detail) => { stage("ready", detail); await ready(); });
  for (const name of ["ended", "failed"]) {
    on(name, (detail) => {
      stage(name, detail);
      say(`The environment ${name}${detail.reason ? `: ${detail.reason}` : ""}.`);
      events.close();
      clearInterval(state.heartbeat);
    });
  }
  // A ticket opens one connection: on a drop, reconnect with a fresh one, resuming after
  // the last event seen.
  events.onerror = () => {
    if (events.readyState === EventSource.CLOSED || events.readyState === EventSource.CONNECTING) {
      events.close();
      setTimeout(() => follow().catch(() => {}), 2000);
    }
  };
}

async function ready() {
  const session = await api("GET", `/v1/sessions/${state.session.id}`);
  state.session = session;
  say(`Ready: ${session.vms.map((vm) => vm.hostname).join(", ")}`);
  $("workspace").hidden = false;
  if ($("tabs").childElementCount) return;
  session.vms.forEach((vm, index) => addTerminal(vm, index === 0));
}

function addTerminal(vm, selected) {
  const tab = document.createElement("button");
  tab.textContent = vm.hostname;
  tab.setAttribute("role", "tab");
  tab.dataset.vm = vm.name;
  const pane = document.createElement("div");
  pane.className = "terminal";
  pane.dataset.vm = vm.name;
  $("tabs").append(tab);
  $("terminals").append(pane);
  const terminal = new Terminal({
    cursorBlink: true, fontSize: 14, theme: { background: "#111418" },
  });
  const fit = new FitAddon.FitAddon();
  terminal.loadAddon(fit);
  terminal.open(pane);
  const show = () => {
    for (const other of $("tabs").children) other.setAttribute("aria-selected", String(other === tab));
    for (const other of $("terminals").children) other.hidden = other !== pane;
    fit.fit();
    terminal.focus();
  };
  tab.addEventListener("click", show);
  connect(vm, terminal);
  if (selected) show(); else pane.hidden = true;
  // Refit whenever the pane's size changes (window resized, stages added above), not only
  // on window resizes; a hidden pane has no size and is fitted when shown.
  new ResizeObserver(() => { if (!pane.hidden) fit.fit(); }).observe(pane);
}

async function connect(vm, terminal) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = new URLSearchParams({ vm: vm.name, ticket: await ticket() });
  const socket = new WebSocket(
    `${scheme}://${location.host}/v1/sessions/${state.session.id}/terminal?${query}`);
  socket.binaryType = "arraybuffer";
  terminal.loadAddon(new AttachAddon.AttachAddon(socket));
  socket.addEventListener("close", (event) => {
    if (event.code === 4000) {
      terminal.write(`\r\n\x1b[31m[${event.reason || "the session ended"}]\x1b[0m\r\n`);
    } else if (state.session.state === "ready") {
      setTimeout(() => connect(vm, terminal).catch(() => {}), 2000);
    }
  });
}

// Leaving: tell the API at once (a beacon survives the page); the closing connections tell
// the gateway too, which closes the session if nothing reconnects within the grace time.
window.addEventListener("pagehide", () => {
  if (!state.session) return;
  const body = new Blob([JSON.stringify({ token: state.token })], { type: "text/plain" });
  navigator.sendBeacon(`/v1/sessions/${state.session.id}/close`, body);
});

loadTemplates().catch((error) => say(`Could not load the templates: ${error.message}`));
