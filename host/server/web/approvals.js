"use strict";
// Everything the server sends is data: it is put in the page with textContent only, never as HTML.
const $ = (id) => document.getElementById(id);
let source = null;

async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) { showLogin("Your session ended; sign in again."); throw new Error("unauthorized"); }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((data && data.error && data.error.message) || response.statusText);
  return data;
}

function showLogin(message) {
  if (source) { source.close(); source = null; }
  $("main").hidden = true;
  $("login").hidden = false;
  if (message) $("status").textContent = message;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function render(actions) {
  const list = $("actions");
  list.replaceChildren();
  $("status").textContent = actions.length === 0
    ? "No pending approvals."
    : actions.length + " pending approval" + (actions.length === 1 ? "" : "s") + ".";
  for (const action of actions) {
    const request = action.request || {};
    const card = el("div", undefined, "card");
    card.dataset.action = action.id;
    card.append(el("h2", request.tool || action.title));
    card.append(el("div", "Job " + action.job_id, "muted job"));
    if (request.reason) card.append(el("div", "Why: " + request.reason, "muted"));
    card.append(el("div", "Expires " + action.expires_at, "muted"));
    card.append(el("pre", JSON.stringify(request.arguments === undefined ? {} : request.arguments, null, 2), "arguments"));
    const buttons = [
      ["Approve", "approve", "approve", {}],
      ["Deny", "deny", "deny", {}],
      ["Approve for session", "session", "approve", { for_session: true }],
    ];
    for (const [label, cls, verb, body] of buttons) {
      const button = el("button", label, cls);
      button.type = "button";
      button.addEventListener("click", async () => {
        card.querySelectorAll("button").forEach((b) => (b.disabled = true));
        try {
          await api("POST", "/v1/actions/" + encodeURIComponent(action.id) + "/" + verb, body);
        } catch (e) {
          $("status").textContent = "Could not answer: " + e.message;
        }
        refresh();
      });
      card.append(button);
    }
    list.append(card);
  }
}

async function refresh() {
  try {
    const data = await api("GET", "/v1/actions?state=pending");
    render(data.actions);
  } catch (e) {
    if (e.message !== "unauthorized") $("status").textContent = "Could not load approvals: " + e.message;
  }
}

function follow() {
  if (source) source.close();
  // The session cookie authenticates the stream (EventSource cannot send headers).
  source = new EventSource("/v1/events?types=action.required,action.resolved,action.expired,action.cancelled");
  for (const type of ["action.required", "action.resolved", "action.expired", "action.cancelled"]) {
    source.addEventListener(type, refresh);
  }
  source.onerror = () => { $("status").textContent = "Reconnecting…"; };
  source.onopen = refresh;
}

async function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  await refresh();
  follow();
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  $("key").value = "";
  const response = await fetch("/v1/session", {
    method: "POST", credentials: "same-origin", headers: { Authorization: "Bearer " + key },
  });
  if (response.status === 204) start();
  else { $("main").hidden = true; alert("That key was not accepted."); }
});

$("signout").addEventListener("click", async () => {
  await fetch("/v1/session", { method: "DELETE", credentials: "same-origin" });
  showLogin("Signed out.");
});

// Already signed in (the cookie is HttpOnly, so ask the server)?
fetch("/v1/actions?state=pending", { credentials: "same-origin" }).then((r) => {
  if (r.ok) start(); else showLogin();
}, () => showLogin());
