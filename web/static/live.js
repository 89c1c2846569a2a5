// pilotfish: pages update live from the server's event stream (Server-Sent Events).
// When an event concerns what the page shows, the page's main part is fetched again
// (header X-Live: 1, the server renders it escaped) and put in place: no reload, no framework.
"use strict";
(function () {
  var main = document.getElementById("live");
  if (!main || !main.dataset.live || !window.EventSource) { return; }
  var what = main.dataset.live, poll = parseFloat(main.dataset.poll || "0");
  var status = document.getElementById("live-status");
  var subjobs = {};  // a workflow page's subjob ids (data-jobs)
  (main.dataset.jobs || "").split(",").forEach(function (j) { if (j) { subjobs[parseInt(j, 10)] = true; } });
  var due = null, busy = false, last = 0;

  // a message says what changed: {kinds: [...], jobs: [ids] or many: true}
  function concerns(ch) {
    var kinds = ch.kinds || [];
    if (kinds.indexOf("resync") >= 0) { return true; }
    if (what === "jobs") { return kinds.indexOf("job") >= 0; }
    if (what.indexOf("job:") === 0) {
      return ch.many === true || (ch.jobs || []).indexOf(parseInt(what.slice(4), 10)) >= 0;
    }
    // pilots and agents: their states, and the tasks they hold and have done
    if (what === "pilots") { return kinds.length > 0; }
    if (what === "workflows") { return kinds.indexOf("workflow") >= 0; }
    if (what.indexOf("workflow:") === 0) {  // its own state, or one of its subjobs'
      if ((ch.workflows || []).indexOf(parseInt(what.slice(9), 10)) >= 0) { return true; }
      if (ch.many === true && kinds.indexOf("job") >= 0) { return true; }
      var jobs = ch.jobs || [];
      for (var i = 0; i < jobs.length; i++) { if (subjobs[jobs[i]]) { return true; } }
      return false;
    }
    return true;  // sites: anything may change a backlog
  }

  function editing() {  // never pull the page from under a field being typed into
    var a = document.activeElement;
    return a && main.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName);
  }

  function refresh() {
    due = null;
    if (busy || editing()) { schedule(1000); return; }
    busy = true; last = Date.now();
    fetch(window.location.href, {headers: {"X-Live": "1"}, credentials: "same-origin"})
      .then(function (r) {
        if (r.status === 404 && what.indexOf("job:") === 0) { return "<p class=\"notice\">this job was deleted</p>"; }
        if (r.status === 404 && what.indexOf("workflow:") === 0) { return "<p class=\"notice\">this workflow was deleted</p>"; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null) { main.innerHTML = html; document.body.dataset.refreshed = String(Date.now()); }
      })
      .catch(function () {})
      .then(function () { busy = false; });
  }

  function schedule(ms) {
    if (due === null) { due = setTimeout(refresh, Math.max(ms, 1000 - (Date.now() - last), 0)); }
  }

  var es = new EventSource("/events/stream");
  es.onopen = function () { if (status) { status.textContent = "live"; } };
  es.onerror = function () { if (status) { status.textContent = "reconnecting…"; } };
  es.onmessage = function (m) {
    var ch;
    try { ch = JSON.parse(m.data); } catch (e) { return; }
    if (concerns(ch)) { schedule(150); }
  };
  if (poll > 0) { setInterval(function () { schedule(0); }, poll * 1000); }  // a running job's output
})();
