// gatefill console: live parts of a page, updated from the server's event stream (no reload, no library).
"use strict";

function setText(root, field, value) {
  root.querySelectorAll('[data-field="' + field + '"]').forEach(function (el) { el.textContent = value; });
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) { return "-"; }
  if (seconds < 60) { return seconds.toFixed(1) + " s"; }
  var units = [["d", 86400], ["h", 3600], ["min", 60]];
  for (var i = 0; i < units.length; i++) {
    if (seconds >= units[i][1]) { return Math.floor(seconds / units[i][1]) + " " + units[i][0]; }
  }
  return seconds + " s";
}

function badge(cls, text) {
  var span = document.createElement("span");
  span.className = cls;
  span.textContent = text;
  return span;
}

function verdictBadge(value) {
  return badge("verdict v-" + String(value || "none").toLowerCase().replace("/", ""), value || "-");
}

function appendLook(table, state) {
  var body = table.tBodies[0];
  if (!body || body.rows.length >= state.looks) { return; }
  var row = body.insertRow();
  row.insertCell().textContent = String(state.looks);
  row.insertCell().textContent = "now";
  row.insertCell().appendChild(verdictBadge(state.verdict));
  table.querySelectorAll("th[data-check]").forEach(function (th) {
    row.insertCell().appendChild(verdictBadge(state.last_look[th.getAttribute("data-check")]));
  });
}

function update(section, state) {
  var page = document;
  page.querySelectorAll('[data-field="status"]').forEach(function (el) {
    el.replaceChildren(badge("status s-" + state.status, state.status));
  });
  setText(section, "done", String(state.done));
  setText(section, "total", String(state.total));
  setText(section, "batches", String(state.batches));
  setText(section, "rate", state.rate === null ? "-" : state.rate.toFixed(1));
  setText(section, "eta", duration(state.eta));
  setText(section, "looks", String(state.looks));
  var results = Object.keys(state.results).sort().map(function (k) { return k + " " + state.results[k]; });
  setText(section, "results", results.join(", ") || "none yet");
  if (state.verdict) {
    section.querySelectorAll('[data-field="verdict"]').forEach(function (el) { el.replaceChildren(verdictBadge(state.verdict)); });
  }
  var percent = state.total ? (state.looks && !state.done ? 100 * state.looks / state.total : state.percent) : 0;
  section.querySelectorAll('[data-field="bar"]').forEach(function (el) { el.style.width = percent + "%"; });
  var looks = page.querySelector("table[data-looks]");
  if (looks && state.looks) { appendLook(looks, state); }
  section.setAttribute("data-updates", String(Number(section.getAttribute("data-updates") || "0") + 1));
}

function watch(section) {
  var source = new EventSource(section.getAttribute("data-live"));
  source.onmessage = function (event) { update(section, JSON.parse(event.data)); };
  source.addEventListener("done", function () { source.close(); section.setAttribute("data-done", "1"); });
}

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("[data-live]").forEach(watch);
});
