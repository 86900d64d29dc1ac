#!/usr/bin/env node
// The demo SPA's static server (no dependencies): serves examples/spa/ at /, the
// browser client clients/js/tessera.js at /tessera.js, and optionally another folder
// at /extra/ (the browser tests' pages). Only GET and HEAD, only files inside those
// folders, on loopback.
//
//   node examples/spa/serve.mjs [--port 8081] [--host 127.0.0.1] [--tessera URL] [--extra DIR]
//
// --tessera is Tessera's URL as the page should call it (default http://localhost:8080);
// a page may also be given ?tessera=URL. Prints "listening on http://localhost:PORT".
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { dirname, extname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const args = new Map();
for (let i = 2; i < process.argv.length; i += 2) args.set(process.argv[i], process.argv[i + 1]);
const port = Number(args.get("--port") ?? 8081);
const host = args.get("--host") ?? "127.0.0.1";
const tessera = args.get("--tessera") ?? "http://localhost:8080";
const extra = args.get("--extra") ? resolve(args.get("--extra")) : null;

const types = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".json": "application/json",
};

/** The file a path names, or null if it is outside the served folders. */
function fileFor(pathname) {
  if (pathname === "/") return join(here, "index.html");
  if (pathname === "/tessera.js") return join(here, "..", "..", "clients", "js", "tessera.js");
  let root = here;
  let rest = pathname;
  if (extra && pathname.startsWith("/extra/")) {
    root = extra;
    rest = pathname.slice("/extra".length);
  }
  const file = normalize(join(root, decodeURIComponent(rest)));
  return file.startsWith(root + sep) ? file : null;
}

const server = createServer(async (req, res) => {
  const url = new URL(req.url, "http://localhost");
  const headers = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
  };
  if (req.method !== "GET" && req.method !== "HEAD") {
    res.writeHead(405, headers).end();
    return;
  }
  if (url.pathname === "/config.js") {
    res.writeHead(200, { ...headers, "content-type": types[".js"] });
    res.end(`export const TESSERA_URL = ${JSON.stringify(tessera)};\n`);
    return;
  }
  const file = fileFor(url.pathname);
  try {
    if (!file) throw new Error("outside");
    const body = await readFile(file);
    res.writeHead(200, { ...headers, "content-type": types[extname(file)] ?? "application/octet-stream" });
    res.end(req.method === "HEAD" ? undefined : body);
  } catch {
    res.writeHead(404, { ...headers, "content-type": "text/plain" }).end("not found\n");
  }
});

server.listen(port, host, () => {
  console.log(`listening on http://localhost:${server.address().port} (Tessera at ${tessera})`);
});
