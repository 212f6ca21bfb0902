// fleetledger dashboard: live rollout progress without a reload.
// Polls the page's progress URL (same origin, with the page's cookie) every 2 s and
// writes the numbers into the wave table. Text only (textContent, never innerHTML),
// so nothing the hub sends can become markup. No library, no build step.
"use strict";
(function () {
  var live = document.getElementById("live");
  if (!live) { return; }
  var url = live.getAttribute("data-progress");
  var polls = 0;
  var FIELDS = ["devices", "applied", "failed", "pending", "timed_out"];

  function set(id, value) {
    var el = document.getElementById(id);
    if (el) { el.textContent = String(value); }
  }

  function apply(p) {
    polls += 1;
    set("rollout-state", p.state);
    set("rollout-wave", p.current_wave + 1);
    set("rollout-reason", p.reason || "");
    p.waves.forEach(function (w) {
      var row = document.querySelector('#waves tr[data-wave="' + Number(w.wave) + '"]');
      if (!row) { return; }
      var cells = { state: w.state, started: w.started, ended: w.ended };
      FIELDS.forEach(function (f) { cells[f] = w.counts[f] || 0; });
      Object.keys(cells).forEach(function (f) {
        var cell = row.querySelector('[data-field="' + f + '"]');
        if (cell) { cell.textContent = String(cells[f]); }
      });
      var bar = row.querySelector("progress");
      if (bar) {
        bar.max = w.counts.devices || 1;
        bar.value = w.counts.applied || 0;
      }
    });
    live.setAttribute("data-source", "poll");
    live.setAttribute("data-polls", String(polls));
    set("live-status", "updated " + new Date().toISOString().slice(11, 19) +
        " UTC (poll " + polls + ")");
  }

  function poll() {
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(apply)
      .catch(function (e) { set("live-status", "not updating: " + e.message); })
      .then(function () { window.setTimeout(poll, 2000); });
  }
  poll();
})();
