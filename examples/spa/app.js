// The demo SPA: a page on another origin than Tessera that signs in with cookie
// delivery through clients/js (served as ./tessera.js), shows the user, manages
// devices (sessions), changes the password and logs out. No build step.
import { TesseraClient, TesseraError } from "./tessera.js";
import { TESSERA_URL } from "./config.js";

const params = new URLSearchParams(location.search);
const base = (params.get("tessera") ?? TESSERA_URL).replace(/\/+$/, "");
const client = new TesseraClient({
  baseUrl: base,
  warnBeforeSecs: Number(params.get("warn") ?? 60),
});
// For the browser tests and the console; the access token stays inside the client.
window.tessera = client;

const $ = (id) => document.getElementById(id);
let countdown = null;

function show(view) {
  for (const v of ["login-view", "app-view", "loading-view"]) $(v).hidden = v !== view;
  $("who").hidden = view !== "app-view";
  document.body.dataset.state = view;
}

function notice(id, text, ok = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("ok", ok);
  el.hidden = !text;
}

/** A JSON call to Tessera with the access token; throws a TesseraError on failure. */
async function api(path, { method = "GET", json } = {}) {
  const init = { method, headers: {} };
  if (json !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const res = await client.fetch(base + path, init);
  if (res.status === 204) return null;
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new TesseraError(res.status, body, Number(res.headers.get("retry-after")) || null);
  return body;
}

function when(iso) {
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function device(userAgent) {
  if (!userAgent) return "Unknown device";
  const browser = /Edg\//.test(userAgent)
    ? "Edge"
    : /Chrome\//.test(userAgent)
      ? "Chrome"
      : /Firefox\//.test(userAgent)
        ? "Firefox"
        : /Safari\//.test(userAgent)
          ? "Safari"
          : userAgent.split(" ")[0].slice(0, 40);
  const os = /Windows/.test(userAgent)
    ? "Windows"
    : /Mac OS X/.test(userAgent)
      ? "macOS"
      : /Android/.test(userAgent)
        ? "Android"
        : /iPhone|iPad/.test(userAgent)
          ? "iOS"
          : /Linux/.test(userAgent)
            ? "Linux"
            : "";
  return os ? `${browser} on ${os}` : browser;
}

function describe(error) {
  switch (error?.error) {
    case "invalid_credentials":
      return "Wrong email or password.";
    case "rate_limited":
      return `Too many attempts. Try again in ${error.retryAfter ?? "a few"} seconds.`;
    case "conflict":
      return "An account with this email already exists. Sign in instead.";
    case "invalid_request":
      return error.message;
    case "network_error":
      return "Cannot reach the sign-in service. Check your connection.";
    default:
      return "Something went wrong. Please try again.";
  }
}

async function renderApp() {
  show("app-view");
  $("expired").hidden = true;
  try {
    const me = await api("/me");
    $("who-email").textContent = me.email;
    $("me-email").textContent = me.email;
    $("me-roles").textContent = me.roles.join(", ");
    $("me-session").textContent = me.session_id;
    $("me-ends").textContent = new Date(client.sessionEndsAt).toLocaleString(undefined, {
      dateStyle: "medium",
      timeStyle: "short",
    });
    await renderSessions();
  } catch (e) {
    if (!client.loggedIn) return; // the session ended meanwhile: an event said so
    throw e;
  }
}

async function renderSessions() {
  const sessions = await api("/sessions");
  const rows = sessions.map((s) => {
    const tr = document.createElement("tr");
    const name = document.createElement("td");
    name.textContent = device(s.user_agent);
    if (s.current) {
      const pill = document.createElement("span");
      pill.className = "pill";
      pill.textContent = "This device";
      name.append(pill);
    }
    const cells = [s.ip ?? "", when(s.created_at), when(s.last_used_at)].map((text) => {
      const td = document.createElement("td");
      td.textContent = text;
      return td;
    });
    const action = document.createElement("td");
    if (!s.current) {
      const end = document.createElement("button");
      end.className = "secondary small";
      end.textContent = "Sign out";
      end.addEventListener("click", async () => {
        end.disabled = true;
        await api(`/sessions/${s.id}`, { method: "DELETE" });
        await renderSessions();
      });
      action.append(end);
    }
    tr.append(name, ...cells, action);
    return tr;
  });
  $("sessions").replaceChildren(...rows);
}

function showLogin(message = "") {
  show("login-view");
  stopCountdown();
  $("expired-text").textContent = message;
  $("expired").hidden = !message;
  $("login-error").hidden = true;
  $("password").value = "";
}

function stopCountdown() {
  clearInterval(countdown);
  countdown = null;
  $("expiring").hidden = true;
}

client.addEventListener("expiring", () => {
  const tick = () => {
    const left = Math.max(0, Math.round((client.sessionEndsAt - Date.now()) / 1000));
    $("expiring-left").textContent =
      left >= 60 ? `${Math.round(left / 60)} minute${left >= 90 ? "s" : ""}` : `${left} seconds`;
  };
  tick();
  $("expiring").hidden = false;
  clearInterval(countdown);
  countdown = setInterval(tick, 1000);
});

const endReasons = {
  expired: "Your session has expired.",
  idle_expired: "Your session expired after a period of inactivity.",
  revoked: "You were signed out.",
  reused: "Your session was ended to protect your account.",
};

client.addEventListener("expired", (e) => {
  showLogin(endReasons[e.detail.reason] ?? "Your session has expired.");
});

client.addEventListener("logout", (e) => {
  showLogin(e.detail.elsewhere ? "You signed out in another tab." : "");
});

client.addEventListener("login", (e) => {
  if (e.detail.elsewhere) renderApp();
});

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const submit = $("login-submit");
  submit.disabled = true;
  try {
    await client.login({
      email: $("email").value,
      password: $("password").value,
      rememberMe: $("remember").checked,
    });
    $("password").value = "";
    await renderApp();
  } catch (e) {
    notice("login-error", describe(e));
  } finally {
    submit.disabled = false;
  }
});

$("register").addEventListener("click", async () => {
  const form = $("login-form");
  if (!form.reportValidity()) return;
  try {
    const res = await fetch(`${base}/users`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ email: $("email").value, password: $("password").value }),
    });
    if (!res.ok) throw new TesseraError(res.status, await res.json().catch(() => ({})));
    form.requestSubmit();
  } catch (e) {
    notice("login-error", describe(e));
  }
});

$("password-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await api("/me/password", {
      method: "PUT",
      json: { current_password: $("current-password").value, new_password: $("new-password").value },
    });
    $("password-form").reset();
    notice("password-result", "Password changed. Your other devices were signed out.", true);
    await renderSessions();
  } catch (e) {
    notice(
      "password-result",
      e.error === "invalid_credentials" ? "The current password is not right." : describe(e),
    );
  }
});

$("logout").addEventListener("click", () => client.logout());
$("logout-here").addEventListener("click", () => client.logout());
$("logout-everywhere").addEventListener("click", () => client.logout({ scope: "global" }));
$("logout-others").addEventListener("click", async () => {
  await client.logout({ scope: "others" });
  await renderSessions();
});

show("loading-view");
if (await client.restore()) {
  await renderApp();
} else if (document.body.dataset.state !== "login-view") {
  // (An "expired" event may already have shown the sign-in form, with its reason.)
  showLogin();
}
