// The Stagecoach console's live pages (served by the origin at /console.js; nothing else is
// loaded). It listens to /api/events (server-sent events) and updates the overview and the
// rollout page in place, and draws the rollout's per-site progress over time as inline SVG.
// Text from the server is only ever set with textContent.
"use strict";
(function () {
  var body = document.body;
  var page = body.getAttribute("data-page");
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
  var SVG = "http://www.w3.org/2000/svg";
  var COLORS = ["#2a6fdb", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285", "#5c940d", "#e67700"];
  // Points kept for the chart (one per change); older ones are dropped.
  var MAX_POINTS = 2000;
  var history = [];

  function byId(id) { return document.getElementById(id); }
  function setText(id, text) { var e = byId(id); if (e && e.textContent !== String(text)) { e.textContent = String(text); } }
  function cell(row, text, cls) {
    var td = document.createElement("td");
    td.textContent = String(text);
    if (cls) { td.className = cls; }
    row.appendChild(td);
    return td;
  }
  function fillBody(id, rows, make) {
    var tbody = byId(id);
    if (!tbody) { return; }
    var fresh = document.createElement("tbody");
    fresh.id = id;
    rows.forEach(function (item) { fresh.appendChild(make(item)); });
    tbody.parentNode.replaceChild(fresh, tbody);
  }
  function countsRow(label, counts, site) {
    var tr = document.createElement("tr");
    if (site !== undefined) { tr.setAttribute("data-site", site); }
    cell(tr, label);
    cell(tr, counts.done, "num done");
    cell(tr, counts.failed, "num failed");
    cell(tr, counts.offered, "num offered");
    cell(tr, counts.pending, "num pending");
    cell(tr, counts.total, "num total");
    return tr;
  }
  function waveText(r) {
    return r.current_wave === null || r.current_wave === undefined
      ? "none" : (r.current_wave + 1) + " of " + r.waves.length;
  }

  function showRollout(r) {
    setText("rollout-bundle", r.bundle);
    setText("rollout-phase", r.phase);
    setText("rollout-wave", waveText(r));
    setText("rollout-failed", r.failed);
    setText("rollout-allowed", r.allowed_failures);
    var actions = byId("rollout-actions");
    if (actions) { actions.hidden = !r.under_way; }
    fillBody("site-progress-rows", r.sites, function (s) { return countsRow(s.site, s.counts, s.site); });
    fillBody("wave-rows", r.waves, function (w) {
      var tr = countsRow((w.index + 1) + ": " + w.site + " (" + w.kind + ")", w.counts);
      if (w.index === r.current_wave) { tr.className = "current"; }
      return tr;
    });
    fillBody("failure-rows", r.failures, function (f) {
      var tr = document.createElement("tr");
      cell(tr, f.node); cell(tr, f.site); cell(tr, f.reason);
      return tr;
    });
    record(r);
    drawChart();
  }

  function record(r) {
    var point = { t: Date.now(), sites: {} };
    r.sites.forEach(function (s) { point.sites[s.site] = { done: s.counts.done, total: s.counts.total }; });
    history.push(point);
    if (history.length > MAX_POINTS) { history.shift(); }
  }

  function svg(name, attrs, parent) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    if (parent) { parent.appendChild(e); }
    return e;
  }

  // Done nodes per site (as a share of the site's nodes) against seconds since the page opened.
  function drawChart() {
    var holder = byId("progress-chart");
    if (!holder || history.length === 0) { return; }
    var W = 640, H = 240, L = 44, R = 150, T = 10, B = 28;
    var chart = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img",
      "aria-label": "done nodes per site over time" });
    var t0 = history[0].t;
    var span = Math.max(history[history.length - 1].t - t0, 1000);
    var x = function (t) { return L + (W - L - R) * (t - t0) / span; };
    var y = function (share) { return T + (H - T - B) * (1 - share); };
    svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fff", stroke: "#d5d9e0" }, chart);
    [0, 0.5, 1].forEach(function (share) {
      svg("line", { x1: L, x2: W - R, y1: y(share), y2: y(share), stroke: "#e3e6eb" }, chart);
      var label = svg("text", { x: L - 6, y: y(share) + 4, "text-anchor": "end", "font-size": 11 }, chart);
      label.textContent = Math.round(share * 100) + "%";
    });
    var end = svg("text", { x: W - R, y: H - 8, "text-anchor": "end", "font-size": 11 }, chart);
    end.textContent = Math.round(span / 1000) + " s";
    var start = svg("text", { x: L, y: H - 8, "font-size": 11 }, chart);
    start.textContent = "0 s";
    var sites = Object.keys(history[history.length - 1].sites).sort();
    sites.forEach(function (site, i) {
      var color = COLORS[i % COLORS.length];
      var points = [];
      history.forEach(function (p, k) {
        var s = p.sites[site];
        if (!s) { return; }
        var share = s.total > 0 ? s.done / s.total : 0;
        // Steps: the value holds until the next change.
        if (k > 0 && points.length > 0) { points.push(x(p.t).toFixed(1) + "," + points[points.length - 1].split(",")[1]); }
        points.push(x(p.t).toFixed(1) + "," + y(share).toFixed(1));
      });
      var last = history[history.length - 1].sites[site];
      if (points.length === 1) { points.push((W - R).toFixed(1) + "," + points[0].split(",")[1]); }
      svg("polyline", { points: points.join(" "), fill: "none", stroke: color, "stroke-width": 2,
        "data-site": site }, chart);
      var legend = svg("text", { x: W - R + 8, y: T + 14 + 16 * i, fill: color, "font-size": 12 }, chart);
      legend.textContent = site + " " + last.done + "/" + last.total;
    });
    while (holder.firstChild) { holder.removeChild(holder.firstChild); }
    holder.appendChild(chart);
  }

  function showOverview(state) {
    setText("overview-nodes", state.nodes);
    fillBody("overview-site-rows", state.sites, function (s) {
      var tr = document.createElement("tr");
      cell(tr, s.site); cell(tr, s.stagers, "num"); cell(tr, s.edges, "num"); cell(tr, s.wan_bytes_from_origin, "num"); cell(tr, s.served_by_stagers, "num");
      return tr;
    });
    var shown = body.getAttribute("data-rollouts") || "";
    var now = state.rollouts.map(function (r) { return r.id; }).join(",");
    if (shown !== now) {
      setText("overview-rollout-note", now === ""
        ? "The rollout ended: reload for the current state."
        : "A rollout started: reload to see it.");
    }
    if (state.rollout && state.rollout.id === shown) {
      setText("rollout-phase", state.rollout.phase);
      setText("rollout-wave", waveText(state.rollout));
      var done = 0, total = 0;
      state.rollout.sites.forEach(function (s) { done += s.counts.done; total += s.counts.total; });
      setText("rollout-done", done + " of " + total);
    }
  }

  function listen() {
    var status = byId("live-status");
    var events = new EventSource("/api/events");
    events.addEventListener("state", function (e) {
      var state;
      try { state = JSON.parse(e.data); } catch (err) { return; }
      if (status) { status.textContent = "live"; status.className = "live"; }
      if (page === "rollout") {
        if (state.rollout && state.rollout.id === body.getAttribute("data-rollout")) { showRollout(state.rollout); }
      } else if (page === "overview") {
        showOverview(state);
      }
    });
    events.onerror = function () {
      if (status) { status.textContent = "reconnecting"; status.className = "stale"; }
    };
  }

  // The buttons post with fetch and the CSRF header, and the page stays: the event stream
  // shows the new phase.
  Array.prototype.forEach.call(document.querySelectorAll("form.rollout-action"), function (form) {
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var result = byId("action-result");
      fetch(form.getAttribute("action"), { method: "POST", headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" })
        .then(function (response) {
          return response.json().then(function (json) {
            if (result) {
              result.textContent = response.ok
                ? form.getAttribute("data-action") + ": done"
                : form.getAttribute("data-action") + ": " + (json.error || response.status);
            }
          });
        })
        .catch(function (err) { if (result) { result.textContent = String(err); } });
    });
  });

  if (page === "rollout" || page === "overview") { listen(); }
})();
