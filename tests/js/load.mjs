// Many respondents' browsers at once: CLIENTS concurrent @supabase/supabase-js clients (one createClient each, as
// each browser has its own) finalize sessions and open their results with functions.invoke, as the 2025-09-17
// front-end did, each client sending its next call as soon as the previous one answered.
//
// Usage: node load.mjs '<json>' or node load.mjs @settings.json (thousands of bodies exceed an argument's size), with
// {url, anonKey, clients, sessions: [{session_id, responses}]}. Every session is
// finalized once, then its results are fetched with the share token the finalize returned: two calls a session.
// Prints one JSON object: per function the answers by status and the latency percentiles (ms), the errors seen
// (status, code, message; at most 20 kept), the wall time and the calls per second. Exits 0 whatever the answers
// (the caller judges them); 2 on bad input.

import { createClient } from "@supabase/supabase-js";
import { readFileSync } from "node:fs";

let config;
try {
  const arg = process.argv[2] ?? "";
  config = JSON.parse(arg.startsWith("@") ? readFileSync(arg.slice(1), "utf8") : arg);
} catch {
  console.error("error: give the load's settings as one JSON argument");
  process.exit(2);
}

const options = { auth: { persistSession: false, autoRefreshToken: false } };
const stats = {};
const errors = [];
let skipped = 0;

function record(name, status, ms) {
  const s = (stats[name] ??= { statuses: {}, latencies: [] });
  s.statuses[status] = (s.statuses[status] ?? 0) + 1;
  s.latencies.push(ms);
}

async function call(client, name, body, address) {
  const started = performance.now();
  let status = "transport";
  let payload = null;
  try {
    // Each respondent is a browser of its own: the server (behind its proxy) sees its address, and rate-limits it.
    const headers = { "x-forwarded-for": address };
    const { data, error, response } = await client.functions.invoke(name, { body, headers });
    status = String(response?.status ?? "transport");
    payload = data;
    if (error) {
      payload = response ? await response.json().catch(() => null) : null;
      if (errors.length < 20) errors.push({ function: name, status, code: payload?.code, message: payload?.error ?? error.message });
    }
  } catch (err) {
    if (errors.length < 20) errors.push({ function: name, status, message: String(err) });
  }
  record(name, status, performance.now() - started);
  return status === "200" ? payload : null;
}

function address(n) {
  return `10.${(n >> 16) & 255}.${(n >> 8) & 255}.${n & 255}`;
}

async function respondent(client, queue) {
  for (let item = queue.pop(); item; item = queue.pop()) {
    const [n, session] = item;
    const done = await call(client, "finalizeAssessment", session, address(n));
    if (done?.share_token) {
      const body = { session_id: session.session_id, share_token: done.share_token };
      await call(client, "get-results-by-session", body, address(n));
    } else {
      skipped += 1; // the finalize failed, so there is no token to open the results with
    }
  }
}

function percentile(sorted, q) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
}

const queue = config.sessions.map((session, n) => [n + 1, session]).reverse();
const started = performance.now();
const clients = Array.from({ length: config.clients }, () => createClient(config.url, config.anonKey, options));
await Promise.all(clients.map((client) => respondent(client, queue)));
const wall = (performance.now() - started) / 1000;

const functions = {};
let calls = 0;
for (const [name, s] of Object.entries(stats)) {
  const sorted = s.latencies.sort((a, b) => a - b);
  calls += sorted.length;
  functions[name] = {
    statuses: s.statuses,
    p50_ms: percentile(sorted, 0.5),
    p95_ms: percentile(sorted, 0.95),
    p99_ms: percentile(sorted, 0.99),
    max_ms: sorted.at(-1) ?? null,
  };
}
console.log(JSON.stringify({
  clients: config.clients, calls, skipped_results: skipped, wall_seconds: wall, calls_per_second: calls / wall,
  functions, errors,
}));
