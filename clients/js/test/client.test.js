// Unit tests of the client's own logic (timers, tab coordination, events) against a
// small stand-in for Tessera's cookie endpoints. The real server and a real browser
// are exercised by the Rust suite (tests/api/browser.rs).
import { after, test } from "node:test";
import assert from "node:assert/strict";

import { TesseraClient, TesseraError } from "../tessera.js";

after(() => {
  const open = process._getActiveHandles().filter((h) => h !== process.stdout && h !== process.stderr);
  if (open.length) console.error("still open:", open.map((h) => h.constructor?.name));
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Tessera's cookie delivery, as far as the client can see it, for one browser. */
class FakeTessera {
  constructor({ accessTtl = 0.6, sessionTtl = 60, graceMs = 1000 } = {}) {
    Object.assign(this, { accessTtl, sessionTtl, graceMs });
    this.cookie = null; // the browser's refresh cookie
    this.sessions = new Map(); // id -> {current, previous, rotatedAt, csrf, endsAt, ended}
    this.access = new Map(); // token -> {expiresAt, session}
    this.refreshes = 0;
    this.reuse = 0;
    this.n = 0;
    this.fetch = this.fetch.bind(this);
  }

  next(kind) {
    return `${kind}-${++this.n}`;
  }

  issue(id, status = 200) {
    const s = this.sessions.get(id);
    const access = this.next("at");
    this.access.set(access, { expiresAt: Date.now() + this.accessTtl * 1000, session: id });
    const body = {
      access_token: access,
      token_type: "Bearer",
      expires_in: this.accessTtl,
      refresh_token_expires_in: Math.max(0, (s.endsAt - Date.now()) / 1000),
      session_id: id,
      csrf_token: s.csrf,
    };
    return json(status, body);
  }

  async fetch(url, init = {}) {
    const path = new URL(url).pathname;
    const headers = new Headers(init.headers);
    if (path === "/login") {
      const body = JSON.parse(init.body);
      assert.equal(body.token_delivery, "cookie");
      assert.equal(init.credentials, "include");
      if (body.password !== "right") return json(401, { error: "invalid_credentials" });
      const id = this.next("session");
      const token = this.next("rt");
      this.sessions.set(id, {
        current: token,
        csrf: this.next("csrf"),
        endsAt: Date.now() + this.sessionTtl * 1000,
      });
      this.cookie = token;
      return this.issue(id);
    }
    if (path === "/refresh") {
      assert.equal(init.credentials, "include");
      const found = [...this.sessions.entries()].find(
        ([, s]) => s.current === this.cookie || s.previous === this.cookie,
      );
      if (!found) return json(400, { error: "invalid_grant", error_reason: "unknown" });
      const [id, s] = found;
      if (headers.get("x-csrf-token") !== s.csrf) return json(403, { error: "access_denied" });
      if (s.ended) return json(400, { error: "invalid_grant", error_reason: s.ended });
      if (Date.now() >= s.endsAt) return json(400, { error: "invalid_grant", error_reason: "expired" });
      if (s.previous === this.cookie) {
        if (Date.now() - s.rotatedAt > this.graceMs) {
          this.reuse++;
          s.ended = "reused";
          return json(400, { error: "invalid_grant", error_reason: "reused" });
        }
        return this.issue(id); // the same successor, already in the cookie
      }
      this.refreshes++;
      s.previous = s.current;
      s.current = this.next("rt");
      s.rotatedAt = Date.now();
      this.cookie = s.current;
      return this.issue(id);
    }
    if (path === "/logout") {
      const s = [...this.sessions.values()].find((x) => x.current === this.cookie);
      if (s && headers.get("x-csrf-token") !== s.csrf) return json(403, { error: "access_denied" });
      if (s) s.ended = "revoked";
      this.cookie = null;
      return new Response(null, { status: 204 });
    }
    if (path === "/api" || path === "/api-bare") {
      const token = (headers.get("authorization") ?? "").replace(/^Bearer /, "");
      const a = this.access.get(token);
      const live = a && a.expiresAt > Date.now() && !this.sessions.get(a.session).ended;
      if (live) return json(200, { ok: true });
      const res = json(401, { error: "invalid_token" });
      if (path === "/api") res.headers.set("www-authenticate", 'Bearer error="invalid_token"');
      return res;
    }
    if (path === "/password") {
      return json(401, { error: "invalid_credentials" });
    }
    return json(404, { error: "not_found" });
  }
}

function json(status, body) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });
}

/** Web Locks for the tabs of one browser: one holder at a time, waits abortable. */
class Locks {
  constructor() {
    this.tail = Promise.resolve();
  }
  request(name, options, callback) {
    const previous = this.tail;
    let release;
    this.tail = new Promise((r) => (release = r));
    return new Promise((resolve, reject) => {
      let started = false;
      options.signal?.addEventListener("abort", () => {
        if (!started) {
          const e = new Error("aborted");
          e.name = "AbortError";
          reject(e);
        }
      });
      previous.then(async () => {
        if (options.signal?.aborted) return release();
        started = true;
        try {
          resolve(await callback());
        } catch (e) {
          reject(e);
        } finally {
          release();
        }
      });
    });
  }
}

class MemoryStorage {
  constructor() {
    this.items = new Map();
  }
  getItem(k) {
    return this.items.has(k) ? this.items.get(k) : null;
  }
  setItem(k, v) {
    this.items.set(k, String(v));
  }
  removeItem(k) {
    this.items.delete(k);
  }
}

let names = 0;

/** A browser: one Tessera, one storage, one lock manager; `tab()` opens a tab. */
function browser(options = {}) {
  const server = new FakeTessera(options);
  const storage = new MemoryStorage();
  const locks = new Locks();
  const name = `test-${process.pid}-${++names}`;
  const tabs = [];
  const tab = (extra = {}) => {
    const client = new TesseraClient({
      baseUrl: "https://auth.example.test",
      fetch: server.fetch,
      storage,
      locks,
      name,
      refreshBeforeSecs: 30,
      warnBeforeSecs: 0.3,
      lockTimeoutMs: 300,
      retryMs: 100,
      ...extra,
    });
    const events = [];
    for (const type of ["login", "refresh", "expiring", "expired", "logout"]) {
      client.addEventListener(type, (e) => events.push({ type, ...e.detail }));
    }
    tabs.push(client);
    return { client, events };
  };
  const close = () => tabs.forEach((t) => t.close());
  return { server, storage, locks, tab, close };
}

test("login keeps the access token in memory and only the CSRF token in storage", async () => {
  const b = browser();
  const { client, events } = b.tab();
  await assert.rejects(
    client.login({ email: "a@example.com", password: "wrong" }),
    (e) => e instanceof TesseraError && e.status === 401 && e.error === "invalid_credentials",
  );
  const body = await client.login({ email: "a@example.com", password: "right" });
  assert.equal(client.accessToken, body.access_token);
  assert.deepEqual([...b.storage.items.values()], [body.csrf_token], "only the CSRF token");
  const res = await client.fetch("https://api.example.test/api");
  assert.equal(res.status, 200);
  assert.deepEqual(events.map((e) => e.type), ["login"]);
  b.close();
});

test("the access token is refreshed before it expires, so calls keep working", async () => {
  const b = browser({ accessTtl: 0.45 });
  const { client } = b.tab();
  await client.login({ email: "a@example.com", password: "right" });
  const first = client.accessToken;
  for (let i = 0; i < 8; i++) {
    await sleep(150);
    assert.equal((await client.fetch("https://api.example.test/api")).status, 200);
  }
  assert.notEqual(client.accessToken, first);
  assert.ok(b.server.refreshes >= 3, `refreshes: ${b.server.refreshes}`);
  assert.equal(b.server.reuse, 0);
  b.close();
});

test("several tabs cause one refresh per expiry", async () => {
  const b = browser({ accessTtl: 0.6 });
  const tabs = [b.tab(), b.tab(), b.tab()];
  await tabs[0].client.login({ email: "a@example.com", password: "right" });
  await sleep(50);
  assert.ok(tabs.every((t) => t.client.accessToken === tabs[0].client.accessToken));
  assert.equal(tabs[1].events[0].type, "login");
  await sleep(1900); // about four lifetimes, each refreshed at two thirds of it
  const expiries = Math.round(1950 / 400);
  assert.ok(
    b.server.refreshes >= expiries - 1 && b.server.refreshes <= expiries + 1,
    `refreshes: ${b.server.refreshes}, expected about ${expiries}`,
  );
  for (const t of tabs) {
    assert.equal((await t.client.fetch("https://api.example.test/api")).status, 200);
  }
  assert.equal(b.server.reuse, 0);
  b.close();
});

test("a tab frozen while holding the lock does not block the others", async () => {
  const b = browser({ accessTtl: 30 });
  const { client } = b.tab();
  await client.login({ email: "a@example.com", password: "right" });
  const before = client.accessToken;
  // Another tab takes the lock and never lets go.
  b.locks.request(`test-${process.pid}-${names}.refresh`, {}, () => new Promise(() => {}));
  const started = Date.now();
  await client.refresh();
  const waited = Date.now() - started;
  assert.notEqual(client.accessToken, before);
  assert.ok(waited >= 250 && waited < 2000, `waited ${waited} ms`);
  b.close();
});

test("a 401 refreshes once and retries; a session that is over says why", async () => {
  const b = browser({ accessTtl: 30 });
  const { client, events } = b.tab();
  await client.login({ email: "a@example.com", password: "right" });
  // The access token stops working (say, its key was withdrawn): one refresh, one retry.
  b.server.access.clear();
  const refreshes = b.server.refreshes;
  assert.equal((await client.fetch("https://api.example.test/api")).status, 200);
  assert.equal(b.server.refreshes, refreshes + 1);

  // Without the challenge header (not exposed cross-origin), the body says so.
  b.server.access.clear();
  assert.equal((await client.fetch("https://api.example.test/api-bare")).status, 200);
  assert.equal(b.server.refreshes, refreshes + 2);
  // A 401 about other credentials (a wrong current password) is not the token's.
  assert.equal((await client.fetch("https://api.example.test/password")).status, 401);
  assert.equal(b.server.refreshes, refreshes + 2);

  // The session is revoked elsewhere: the retry's refresh fails for good.
  for (const s of b.server.sessions.values()) s.ended = "revoked";
  const res = await client.fetch("https://api.example.test/api");
  assert.equal(res.status, 401);
  assert.equal(client.loggedIn, false);
  assert.deepEqual(events.at(-1), { type: "expired", reason: "revoked", elsewhere: false });
  assert.equal(b.storage.items.size, 0, "the CSRF token is forgotten");
  b.close();
});

test("logout in one tab logs every tab out", async () => {
  const b = browser({ accessTtl: 30 });
  const one = b.tab();
  const two = b.tab();
  await one.client.login({ email: "a@example.com", password: "right" });
  await sleep(20);
  assert.ok(two.client.loggedIn);
  await one.client.logout();
  await sleep(20);
  assert.equal(two.client.loggedIn, false);
  assert.deepEqual(two.events.at(-1), { type: "logout", scope: "local", elsewhere: true });
  assert.deepEqual(one.events.at(-1), { type: "logout", scope: "local", elsewhere: false });
  assert.equal(b.server.cookie, null);
  b.close();
});

test("the end of a session is announced, then reported as expired", async () => {
  const b = browser({ accessTtl: 30, sessionTtl: 0.8 });
  const { client, events } = b.tab();
  await client.login({ email: "a@example.com", password: "right" });
  await sleep(700);
  const warning = events.find((e) => e.type === "expiring");
  assert.ok(warning, JSON.stringify(events));
  assert.ok(warning.secondsLeft <= 1);
  await sleep(900);
  assert.deepEqual(events.at(-1), { type: "expired", reason: "expired", elsewhere: false });
  assert.equal(client.loggedIn, false);
  b.close();
});

test("a reloaded page resumes the session through the cookie", async () => {
  const b = browser({ accessTtl: 30 });
  const first = b.tab();
  await first.client.login({ email: "a@example.com", password: "right" });
  first.client.close();
  const reloaded = b.tab();
  assert.equal(reloaded.client.loggedIn, false);
  assert.equal(await reloaded.client.restore(), true);
  assert.equal((await reloaded.client.fetch("https://api.example.test/api")).status, 200);
  // With no CSRF token kept there is no session to resume, and nothing is asked.
  const fresh = browser();
  assert.equal(await fresh.tab().client.restore(), false);
  assert.equal(fresh.server.refreshes, 0);
  b.close();
  fresh.close();
});

test("a refresh that fails for a passing reason keeps the session and retries", async () => {
  const b = browser({ accessTtl: 30 });
  const { client } = b.tab();
  await client.login({ email: "a@example.com", password: "right" });
  const real = b.server.fetch;
  let down = true;
  const flaky = (url, init) =>
    down ? Promise.resolve(json(503, { error: "temporarily_unavailable" })) : real(url, init);
  // The client was built with the server's fetch; swap what it calls underneath.
  b.server.fetch = flaky;
  const tab = b.tab({ fetch: (url, init) => b.server.fetch(url, init) });
  assert.equal(await tab.client.restore(), false, "Tessera is down: not logged in yet");
  down = false;
  assert.equal(await tab.client.restore(), true);
  assert.ok(client.loggedIn, "the first tab was never logged out");
  b.close();
});
