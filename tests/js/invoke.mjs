// Calls every PRISM function of `gatefill serve functions` with the real @supabase/supabase-js client, as the
// 2025-09-17 front-end did (createClient(projectUrl, key), then functions.invoke with the bodies of
// spec/prism-data-model.md §2), plus the CORS preflight a browser sends first, and checks every answer.
//
// Usage: node invoke.mjs '<json>' with {url, anonKey, serviceKey, origin, finalize: {session_id, responses},
// scoring: {session_id}}. Prints one JSON object: the calls made, every check with its outcome, and the headers the
// client sent. It exits 0 whatever the checks say (the pytest side asserts on the JSON); 2 on bad input.

import { createClient } from "@supabase/supabase-js";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const clientVersion = require("@supabase/supabase-js/package.json").version;

const FUNCTIONS = ["finalizeAssessment", "get-results-by-session", "score_fc_session", "score_prism"];
// What the front-end's browser asks for in its preflight: upstream's corsHeaders allow exactly these.
const BROWSER_HEADERS = ["authorization", "x-client-info", "apikey", "content-type"];
// Headers a browser never lists in Access-Control-Request-Headers (CORS-safelisted with their usual values).
const SAFELISTED = new Set(["accept", "accept-language", "content-language"]);
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

let config;
try {
  config = JSON.parse(process.argv[2] ?? "");
} catch {
  console.error("error: give the test's settings as one JSON argument");
  process.exit(2);
}

const checks = [];
const calls = [];
const sent = [];

function check(call, what, ok, detail = undefined) {
  checks.push({ call, what, ok: Boolean(ok), ...(ok ? {} : { detail }) });
}

// A browser adds Origin to every cross-origin request; supabase-js in node does not, so this fetch adds it, and
// records what the client itself put in each request.
const browserFetch = (input, init = {}) => {
  const headers = new Headers(init.headers);
  sent.push([...headers.keys()].sort());
  headers.set("origin", config.origin);
  return fetch(input, { ...init, headers });
};

const options = { auth: { persistSession: false, autoRefreshToken: false }, global: { fetch: browserFetch } };
const anon = createClient(config.url, config.anonKey, options);
const service = createClient(config.url, config.serviceKey, options);

async function invoke(label, client, name, body, expected) {
  const { data, error, response } = await client.functions.invoke(name, { body });
  const status = response?.status ?? null;
  let payload = data;
  if (error && response) {
    payload = await response.json().catch(() => null);
  }
  calls.push({ label, function: name, status });
  check(label, `status ${expected}`, status === expected, { status, payload, error: error?.name });
  if (expected >= 400) {
    check(label, "the client reports a FunctionsHttpError", error?.name === "FunctionsHttpError", error?.name);
    check(label, "error body {error, code}", typeof payload?.error === "string" && typeof payload?.code === "string", payload);
  }
  check(label, "CORS: any origin may read the answer", response?.headers.get("access-control-allow-origin") === "*");
  return { payload, response };
}

function noStore(label, response) {
  check(label, "Cache-Control: no-store", response?.headers.get("cache-control") === "no-store",
    response?.headers.get("cache-control"));
}

async function preflight(label, name, requested) {
  const response = await fetch(`${config.url}/functions/v1/${name}`, {
    method: "OPTIONS",
    headers: {
      origin: config.origin,
      "access-control-request-method": "POST",
      "access-control-request-headers": requested.join(", "),
    },
  });
  calls.push({ label, function: name, status: response.status, method: "OPTIONS" });
  check(label, "preflight 200", response.status === 200, response.status);
  const allowOrigin = response.headers.get("access-control-allow-origin");
  check(label, "preflight allows the origin", allowOrigin === "*" || allowOrigin === config.origin, allowOrigin);
  const methods = (response.headers.get("access-control-allow-methods") ?? "").toUpperCase();
  check(label, "preflight allows POST", methods.split(/,\s*/).includes("POST"), methods);
  const allowed = (response.headers.get("access-control-allow-headers") ?? "").toLowerCase().split(/,\s*/);
  const missing = requested.filter((h) => !allowed.includes(h));
  check(label, "preflight allows every requested header", missing.length === 0, { missing, allowed });
}

async function main() {
  const finalizeId = config.finalize.session_id;
  const scoringId = config.scoring.session_id;

  for (const name of FUNCTIONS) {
    await preflight(`preflight ${name}`, name, BROWSER_HEADERS);
  }

  // The respondent's browser finalizes with the anon key, then opens the results with the token it got back.
  const done = await invoke("finalizeAssessment", anon, "finalizeAssessment", config.finalize, 200);
  const reply = done.payload ?? {};
  check("finalizeAssessment", "ok, status success, the session", reply.ok === true && reply.status === "success"
    && reply.session_id === finalizeId, reply);
  check("finalizeAssessment", "a share token", UUID.test(reply.share_token ?? ""), reply.share_token);
  check("finalizeAssessment", "results_url names the session and its token",
    typeof reply.results_url === "string" && reply.results_url.endsWith(`/results/${finalizeId}?t=${reply.share_token}`),
    reply.results_url);
  check("finalizeAssessment", "a profile with a type code", typeof reply.profile?.type_code === "string", reply.profile);
  noStore("finalizeAssessment", done.response);

  // The preflight a browser sends for exactly the headers this client version sends.
  const clientHeaders = [...new Set(sent.flat())].filter((h) => !SAFELISTED.has(h)).sort();
  await preflight("preflight of the client's own headers", "finalizeAssessment", clientHeaders);

  const results = await invoke("get-results-by-session", anon, "get-results-by-session",
    { session_id: finalizeId, share_token: reply.share_token }, 200);
  const shown = results.payload ?? {};
  check("get-results-by-session", "status success, the profile and the session", shown.status === "success"
    && shown.profile?.session_id === finalizeId && shown.session?.status === "completed", shown);
  check("get-results-by-session", "the profile does not carry the share token", !("share_token" in (shown.profile ?? {})));
  noStore("get-results-by-session", results.response);

  const tokenless = await invoke("results without a token", anon, "get-results-by-session", { session_id: finalizeId }, 401);
  check("results without a token", "code TOKEN_REQUIRED", tokenless.payload?.code === "TOKEN_REQUIRED", tokenless.payload);
  noStore("results without a token", tokenless.response);
  const wrong = await invoke("results with another token", anon, "get-results-by-session",
    { session_id: finalizeId, share_token: crypto.randomUUID() }, 403);
  check("results with another token", "code ACCESS_DENIED", wrong.payload?.code === "ACCESS_DENIED", wrong.payload);
  const empty = await invoke("finalize without a session", anon, "finalizeAssessment", {}, 400);
  check("finalize without a session", "code SESSION_ID_REQUIRED", empty.payload?.code === "SESSION_ID_REQUIRED", empty.payload);

  // The backfill's operations. The live platform let anyone call them (verify_jwt = false); this server wants the
  // service-role key (README: departures), so the anon key is refused and the service-role client goes through.
  const fcBody = { session_id: scoringId, version: "v1.2", basis: "functions" };
  const fcAnon = await invoke("score_fc_session with the anon key", anon, "score_fc_session", fcBody, 401);
  check("score_fc_session with the anon key", "code UNAUTHORIZED", fcAnon.payload?.code === "UNAUTHORIZED", fcAnon.payload);
  const prismAnon = await invoke("score_prism with the anon key", anon, "score_prism", { session_id: scoringId }, 401);
  check("score_prism with the anon key", "code UNAUTHORIZED", prismAnon.payload?.code === "UNAUTHORIZED", prismAnon.payload);

  const fc = await invoke("score_fc_session", service, "score_fc_session", fcBody, 200);
  const tally = fc.payload ?? {};
  check("score_fc_session", "the request echoed, six blocks answered", tally.session_id === scoringId
    && tally.version === "v1.2" && tally.basis === "functions" && tally.blocks_answered === 6, tally);
  check("score_fc_session", "eight function scores", Object.keys(tally.scores ?? {}).length === 8, tally.scores);
  const prism = await invoke("score_prism", service, "score_prism", { session_id: scoringId }, 200);
  const scored = prism.payload ?? {};
  check("score_prism", "status success with the session's profile", scored.status === "success"
    && scored.profile?.session_id === scoringId && typeof scored.profile?.type_code === "string", scored);
  check("score_prism", "gap_to_second and confidence_numeric", "gap_to_second" in scored
    && "confidence_numeric" in scored, Object.keys(scored));

  const failed = checks.filter((c) => !c.ok);
  console.log(JSON.stringify({
    client: `@supabase/supabase-js ${clientVersion}`,
    node: process.version,
    calls,
    checks: { total: checks.length, passed: checks.length - failed.length, failed },
    client_headers: clientHeaders,
  }, null, 2));
}

main().catch((err) => {
  console.log(JSON.stringify({ crashed: String(err?.stack ?? err), calls, checks: { total: checks.length, failed: checks.filter((c) => !c.ok) } }));
});
