// Type declarations of tessera.js (Tessera's browser client).

export interface TesseraClientOptions {
  /** Tessera's URL, e.g. "https://auth.example.com". */
  baseUrl: string;
  /** Refresh this long before the access token expires (at most a third of its lifetime). Default 30. */
  refreshBeforeSecs?: number;
  /** Emit "expiring" this long before the session's end. Default 60. */
  warnBeforeSecs?: number;
  /** The longest wait for another tab's refresh before refreshing anyway. Default 3000. */
  lockTimeoutMs?: number;
  /** Wait before retrying a refresh that failed for a passing reason (no Retry-After). Default 5000. */
  retryMs?: number;
  /** Lock, channel and storage names. Default "tessera". */
  name?: string;
  fetch?: typeof fetch;
  /** Where the CSRF token is kept (never the refresh token). Default localStorage. */
  storage?: Pick<Storage, "getItem" | "setItem" | "removeItem"> | null;
  /** Web Locks. Default navigator.locks. */
  locks?: Pick<LockManager, "request"> | null;
  /** Default the global BroadcastChannel. */
  BroadcastChannel?: typeof BroadcastChannel | null;
}

/** Tessera's token response with cookie delivery. */
export interface CookieTokenResponse {
  access_token: string;
  token_type: "Bearer";
  expires_in: number;
  refresh_token_expires_in: number;
  session_id: string;
  csrf_token: string;
}

export type SessionEndReason =
  | "expired"
  | "idle_expired"
  | "revoked"
  | "reused"
  | "unknown"
  | "access_denied";

export interface TesseraEvents {
  login: CustomEvent<{ sessionId: string; elsewhere: boolean }>;
  refresh: CustomEvent<{ sessionId: string; elsewhere: boolean }>;
  expiring: CustomEvent<{ secondsLeft: number; endsAt: number }>;
  expired: CustomEvent<{ reason: SessionEndReason; elsewhere: boolean }>;
  logout: CustomEvent<{ scope: "local" | "others" | "global"; elsewhere: boolean }>;
}

export class TesseraError extends Error {
  /** HTTP status, 0 for a network failure. */
  readonly status: number;
  /** The contract's `error` code ("invalid_credentials", "invalid_grant", ...). */
  readonly error: string | null;
  /** `error_reason` of a refresh failure. */
  readonly reason: SessionEndReason | null;
  /** Retry-After in seconds, if given. */
  readonly retryAfter: number | null;
}

export class TesseraClient extends EventTarget {
  constructor(options: TesseraClientOptions);
  readonly loggedIn: boolean;
  /** The access token, kept in memory only. */
  readonly accessToken: string | null;
  readonly sessionId: string | null;
  /** When the session ends at the latest (ms since the epoch), or 0. */
  readonly sessionEndsAt: number;
  login(credentials: { email: string; password: string; rememberMe?: boolean }): Promise<CookieTokenResponse>;
  /** Resumes the browser's session after a page load; resolves to whether logged in. */
  restore(): Promise<boolean>;
  /** A new access token, coordinated across tabs. */
  refresh(): Promise<void>;
  /** fetch with the access token attached; refreshes when due and once on a 401. */
  fetch(input: RequestInfo | URL, init?: RequestInit): Promise<Response>;
  logout(options?: { scope?: "local" | "others" | "global" }): Promise<void>;
  close(): void;
  addEventListener<K extends keyof TesseraEvents>(
    type: K,
    listener: (event: TesseraEvents[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
}
