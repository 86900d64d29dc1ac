// Tessera's browser client: logs in with cookie delivery, keeps the access token in
// memory only, attaches it to the app's requests, refreshes it shortly before it
// expires (and once on a 401), and coordinates the tabs of one browser so that N tabs
// cause one refresh.
//
// Where things live:
// - the refresh token: in Tessera's HttpOnly cookie; this code never sees it;
// - the access token: in this object's memory (and passed to the other tabs over a
//   BroadcastChannel, which only same-origin pages can join);
// - the CSRF token: in memory, and in localStorage so that a reloaded page or a new
//   tab can refresh. It is no credential by itself: it is only accepted together with
//   the HttpOnly cookie, which scripts cannot read.
//
// Tabs: a refresh runs under a Web Lock; the tab holding it refreshes and broadcasts
// the new access token, and a tab that waited for the lock finds a fresh token and
// does not refresh again. The lock is only an optimisation: it is requested with a
// timeout, so a tab that was closed or frozen while holding it never blocks the
// others (they refresh anyway; Tessera's reuse grace window gives concurrent refreshes
// the same successor, so nothing breaks and no reuse is detected).
//
// Events (an EventTarget; `event.detail` holds the fields):
// - "login"    {sessionId, elsewhere}       logged in (here, or in another tab)
// - "refresh"  {sessionId, elsewhere}       a new access token
// - "expiring" {secondsLeft, endsAt}        the session ends soon (its absolute end,
//                                           e.g. a session without remember-me)
// - "expired"  {reason, elsewhere}          the session is over: Tessera's error_reason
//                                           ("expired", "idle_expired", "revoked",
//                                           "reused", "unknown") or "access_denied"
// - "logout"   {scope, elsewhere}           logged out (here, or in another tab)

const DEFAULT_NAME = "tessera";
/** How long a tab keeps the refresh lock after refreshing (see #coordinatedRefresh). */
const SETTLE_MS = 250;

// CustomEvent is global in browsers and Node 19+; Node 18 has only Event.
const CustomEventImpl =
  globalThis.CustomEvent ??
  class extends Event {
    constructor(type, options) {
      super(type);
      this.detail = options?.detail ?? null;
    }
  };

/** An error answer from Tessera (the contract's error body), or a network failure. */
export class TesseraError extends Error {
  constructor(status, body = {}, retryAfter = null) {
    super(body.error_description || body.error || `HTTP ${status}`);
    this.name = "TesseraError";
    this.status = status;
    this.error = body.error ?? null;
    this.reason = body.error_reason ?? null;
    this.retryAfter = retryAfter;
  }
}

export class TesseraClient extends EventTarget {
  #base;
  #fetch;
  #storage;
  #locks;
  #channel;
  #name;
  #refreshBeforeSecs;
  #warnBeforeSecs;
  #lockTimeoutMs;
  #retryMs;

  #access = null; // the access token
  #accessExpiresAt = 0; // ms since the epoch
  #refreshAt = 0; // when this tab means to refresh: a third of the lifetime before the end
  #sessionEndsAt = 0;
  #sessionId = null;
  #adoptedAt = 0; // when this tab took its current tokens
  #csrf = null;
  #inflight = null;
  #timers = [];
  #closed = false;
  #waiting = []; // resolvers of tabs waiting for another tab's tokens

  /**
   * @param {object} options
   * @param {string} options.baseUrl  Tessera's URL, e.g. "https://auth.example.com"
   * @param {number} [options.refreshBeforeSecs=30]  refresh this long before the
   *   access token expires (at most a third of its lifetime)
   * @param {number} [options.warnBeforeSecs=60]  "expiring" this long before the
   *   session's end
   * @param {number} [options.lockTimeoutMs=3000]  longest wait for another tab's refresh
   * @param {string} [options.name="tessera"]  lock, channel and storage names
   * @param {typeof fetch} [options.fetch]
   * @param {Storage|null} [options.storage]  where the CSRF token is kept (localStorage)
   * @param {LockManager|null} [options.locks]  Web Locks (navigator.locks)
   * @param {typeof BroadcastChannel|null} [options.BroadcastChannel]
   */
  constructor(options) {
    super();
    if (!options?.baseUrl) throw new TypeError("TesseraClient needs a baseUrl");
    this.#base = options.baseUrl.replace(/\/+$/, "");
    this.#fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.#storage = options.storage !== undefined ? options.storage : globalThis.localStorage ?? null;
    this.#locks = options.locks !== undefined ? options.locks : globalThis.navigator?.locks ?? null;
    this.#name = options.name ?? DEFAULT_NAME;
    this.#refreshBeforeSecs = options.refreshBeforeSecs ?? 30;
    this.#warnBeforeSecs = options.warnBeforeSecs ?? 60;
    this.#lockTimeoutMs = options.lockTimeoutMs ?? 3000;
    this.#retryMs = options.retryMs ?? 5000;
    this.#csrf = this.#storage?.getItem(`${this.#name}.csrf`) ?? readCsrfCookie();
    const Channel =
      options.BroadcastChannel !== undefined ? options.BroadcastChannel : globalThis.BroadcastChannel;
    if (Channel) {
      this.#channel = new Channel(`${this.#name}.session`);
      this.#channel.onmessage = (event) => this.#onMessage(event.data);
    }
  }

  /** Whether this tab holds an access token. */
  get loggedIn() {
    return this.#access !== null;
  }

  /** The access token (memory only), or null. */
  get accessToken() {
    return this.#access;
  }

  get sessionId() {
    return this.#sessionId;
  }

  /** When the session ends at the latest (ms since the epoch), or 0. */
  get sessionEndsAt() {
    return this.#sessionEndsAt;
  }

  /** Logs in; the refresh token goes into Tessera's HttpOnly cookie. */
  async login({ email, password, rememberMe = false }) {
    const body = await this.#call("/login", {
      email,
      password,
      remember_me: rememberMe,
      token_delivery: "cookie",
    });
    this.#accept(body);
    this.#broadcast({ type: "login", tokens: this.#snapshot() });
    this.#emit("login", { sessionId: this.#sessionId, elsewhere: false });
    return body;
  }

  /**
   * After a page load: resumes the browser's session if it has one (a refresh through
   * the cookie). Resolves to whether this tab is logged in.
   */
  async restore() {
    if (this.loggedIn) return true;
    if (!this.#csrf) return false;
    try {
      await this.refresh();
    } catch {
      // A network or server failure: not logged in for now.
    }
    return this.loggedIn;
  }

  /**
   * A new access token, coordinated with the other tabs. Resolves once this tab has a
   * fresh one; rejects with a TesseraError when the session is over ("expired" is
   * emitted too) or Tessera cannot be reached.
   */
  refresh() {
    this.#inflight ??= this.#coordinatedRefresh().finally(() => {
      this.#inflight = null;
    });
    return this.#inflight;
  }

  /**
   * `fetch` for the app's own API: adds `Authorization: Bearer`, refreshes first when
   * the access token is about to expire, and once more on a 401 that says the token
   * is not valid (RFC 6750 `invalid_token`; not, say, a wrong current password), then
   * retries once. A body given as a stream cannot be sent twice: pass a string, Blob
   * or FormData.
   */
  async fetch(input, init = {}) {
    if (this.loggedIn && this.#dueForRefresh()) {
      await this.refresh().catch(() => {});
    }
    const used = this.#access;
    let res = await this.#fetch(input, withBearer(init, used));
    if (res.status === 401 && this.loggedIn && (await refusedToken(res))) {
      if (this.#access === used) {
        try {
          await this.refresh();
        } catch {
          return res;
        }
      }
      res = await this.#fetch(input, withBearer(init, this.#access));
    }
    return res;
  }

  /**
   * Logs out through the cookie: "local" (this browser's session, every tab), "others"
   * (the user's other sessions) or "global" (all of them).
   */
  async logout({ scope = "local" } = {}) {
    try {
      await this.#call("/logout", scope === "local" ? undefined : { scope }, true);
    } finally {
      if (scope !== "others") {
        this.#clear();
        this.#broadcast({ type: "logout", scope });
        this.#emit("logout", { scope, elsewhere: false });
      }
    }
  }

  /** Stops timers and leaves the tab channel (e.g. when the app unmounts). */
  close() {
    this.#closed = true;
    this.#clearTimers();
    this.#channel?.close();
  }

  async #coordinatedRefresh() {
    const startedWith = this.#access;
    const tookOther = () =>
      this.#access !== null && this.#access !== startedWith && !this.#dueForRefresh();
    const run = async () => {
      // Another tab refreshed while this one waited for the lock: take its token. Its
      // message may still be on the way (it is sent as the lock is released, and a
      // tab may even decide to refresh after that), but the time of that refresh is
      // already in storage: later than this tab's tokens means fresher ones are coming,
      // so wait for them rather than rotate the shared cookie a second time.
      if (tookOther()) return false;
      if (this.#lastRefreshAt() > this.#adoptedAt) {
        await this.#tokensFromAnotherTab(1000);
        if (tookOther()) return false;
      }
      await this.#refreshNow();
      return true;
    };
    if (!this.#locks) return run();
    const timeout = new AbortController();
    const timer = setTimeout(() => timeout.abort(), this.#lockTimeoutMs);
    let ran = false;
    try {
      await this.#locks.request(`${this.#name}.refresh`, { signal: timeout.signal }, async () => {
        clearTimeout(timer);
        ran = true;
        // After a refresh, keep the lock a moment: the other tabs' copies of storage
        // and the broadcast reach them asynchronously, and a tab must not take the lock
        // and refresh again before they have.
        if (await run()) await new Promise((r) => setTimeout(r, SETTLE_MS));
      });
    } catch (e) {
      clearTimeout(timer);
      // The lock did not come in time (a frozen tab may hold it): go on without it.
      if (!ran && e?.name === "AbortError") return run();
      throw e;
    }
  }

  async #refreshNow() {
    let body;
    try {
      body = await this.#call("/refresh", undefined, true);
    } catch (e) {
      if (e instanceof TesseraError && (e.error === "invalid_grant" || e.error === "access_denied")) {
        const reason = e.reason ?? e.error;
        const wasLoggedIn = this.loggedIn || this.#csrf !== null;
        this.#clear();
        this.#broadcast({ type: "expired", reason });
        if (wasLoggedIn) this.#emit("expired", { reason, elsewhere: false });
      } else if (this.loggedIn) {
        // Tessera is unreachable or busy: try again soon, the token may still be valid.
        const wait = e instanceof TesseraError && e.retryAfter ? e.retryAfter * 1000 : this.#retryMs;
        this.#later(wait, () => this.refresh().catch(() => {}));
      }
      throw e;
    }
    this.#accept(body);
    this.#storage?.setItem(`${this.#name}.refreshed_at`, String(this.#adoptedAt));
    this.#broadcast({ type: "tokens", tokens: this.#snapshot() });
    this.#emit("refresh", { sessionId: this.#sessionId, elsewhere: false });
  }

  /** When a tab of this browser last refreshed (a time, nothing secret). */
  #lastRefreshAt() {
    return Number(this.#storage?.getItem(`${this.#name}.refreshed_at`)) || 0;
  }

  /** Resolves when another tab's tokens arrive, or after `ms`. */
  #tokensFromAnotherTab(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.#waiting.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /** POST to Tessera with the cookie (and the CSRF token); the JSON body or a TesseraError. */
  async #call(path, json, withCsrf = false) {
    const headers = {};
    if (json !== undefined) headers["content-type"] = "application/json";
    if (withCsrf && this.#csrf) headers["x-csrf-token"] = this.#csrf;
    let res;
    try {
      res = await this.#fetch(`${this.#base}${path}`, {
        method: "POST",
        credentials: "include",
        headers,
        body: json === undefined ? undefined : JSON.stringify(json),
      });
    } catch (e) {
      throw Object.assign(new TesseraError(0, { error: "network_error" }), { cause: e });
    }
    if (res.status === 204) return null;
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      const retryAfter = Number(res.headers.get("retry-after")) || null;
      throw new TesseraError(res.status, body, retryAfter);
    }
    return body;
  }

  /** Takes a token response (login or refresh). */
  #accept(body) {
    const now = Date.now();
    this.#adopt({
      access: body.access_token,
      accessExpiresAt: now + body.expires_in * 1000,
      sessionEndsAt: now + body.refresh_token_expires_in * 1000,
      sessionId: body.session_id,
      csrf: body.csrf_token,
    });
  }

  #snapshot() {
    return {
      access: this.#access,
      accessExpiresAt: this.#accessExpiresAt,
      sessionEndsAt: this.#sessionEndsAt,
      sessionId: this.#sessionId,
      csrf: this.#csrf,
    };
  }

  #adopt(t) {
    this.#adoptedAt = Date.now();
    this.#access = t.access;
    this.#accessExpiresAt = t.accessExpiresAt;
    const lifetime = Math.max(0, t.accessExpiresAt - this.#adoptedAt);
    this.#refreshAt = t.accessExpiresAt - Math.min(this.#refreshBeforeSecs * 1000, lifetime / 3);
    this.#sessionEndsAt = t.sessionEndsAt;
    this.#sessionId = t.sessionId;
    if (t.csrf) {
      this.#csrf = t.csrf;
      this.#storage?.setItem(`${this.#name}.csrf`, t.csrf);
    }
    this.#schedule();
  }

  #clear() {
    this.#access = null;
    this.#accessExpiresAt = 0;
    this.#refreshAt = 0;
    this.#sessionEndsAt = 0;
    this.#sessionId = null;
    this.#csrf = null;
    this.#storage?.removeItem(`${this.#name}.csrf`);
    this.#storage?.removeItem(`${this.#name}.refreshed_at`);
    this.#clearTimers();
  }

  #dueForRefresh() {
    return Date.now() >= this.#refreshAt - 50;
  }

  /** Timers: the next refresh, the expiry warning, the session's end. */
  #schedule() {
    this.#clearTimers();
    if (this.#closed || !this.#access) return;
    const now = Date.now();
    if (this.#refreshAt < this.#sessionEndsAt) {
      this.#later(this.#refreshAt - now, () => this.refresh().catch(() => {}));
    }
    const warnAt = this.#sessionEndsAt - this.#warnBeforeSecs * 1000;
    this.#later(warnAt - now, () => {
      const secondsLeft = Math.max(0, Math.round((this.#sessionEndsAt - Date.now()) / 1000));
      this.#emit("expiring", { secondsLeft, endsAt: this.#sessionEndsAt });
    });
    // At the session's end the refresh fails for good, which says why ("expired").
    this.#later(this.#sessionEndsAt - now + 500, () => this.refresh().catch(() => {}));
  }

  #later(ms, fn) {
    if (this.#closed) return;
    this.#timers.push(setTimeout(fn, Math.max(0, ms)));
  }

  #clearTimers() {
    for (const t of this.#timers) clearTimeout(t);
    this.#timers = [];
  }

  #broadcast(message) {
    try {
      this.#channel?.postMessage(message);
    } catch {
      // A closed channel: nothing to tell.
    }
  }

  #onMessage(message) {
    if (this.#closed || !message) return;
    switch (message.type) {
      case "login":
      case "tokens": {
        const first = !this.loggedIn;
        this.#adopt(message.tokens);
        for (const wake of this.#waiting.splice(0)) wake();
        const type = message.type === "login" || first ? "login" : "refresh";
        this.#emit(type, { sessionId: this.#sessionId, elsewhere: true });
        break;
      }
      case "logout":
        if (this.loggedIn) {
          this.#clear();
          this.#emit("logout", { scope: message.scope, elsewhere: true });
        }
        break;
      case "expired":
        if (this.loggedIn) {
          this.#clear();
          this.#emit("expired", { reason: message.reason, elsewhere: true });
        }
        break;
    }
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEventImpl(type, { detail }));
  }
}

/** Whether a 401 is about the access token (RFC 6750), not other credentials. */
async function refusedToken(res) {
  const challenge = res.headers.get("www-authenticate");
  if (challenge) return /invalid_token/.test(challenge);
  // Cross-origin without the header exposed: the contract's error body says it.
  const body = await res
    .clone()
    .json()
    .catch(() => ({}));
  return body.error === "invalid_token";
}

function withBearer(init, token) {
  const headers = new Headers(init.headers ?? {});
  if (token) headers.set("authorization", `Bearer ${token}`);
  return { ...init, headers };
}

/** The CSRF cookie, where the page may read it (same origin, or `cookies.domain`). */
function readCsrfCookie() {
  const cookies = globalThis.document?.cookie;
  if (!cookies) return null;
  for (const part of cookies.split(";")) {
    const [name, ...value] = part.trim().split("=");
    if (["__Host-tessera_csrf", "__Secure-tessera_csrf", "tessera_csrf"].includes(name)) {
      return value.join("=") || null;
    }
  }
  return null;
}
