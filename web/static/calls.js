"use strict";
/* The call list, live: new calls slide in at the top (first page, no search), rows update
   their status, turns, median V2V and duration as the calls go on. On every (re)connect the
   rows are refreshed from the server's own rendering of this page. */
(function () {
  const table = document.getElementById("calls");
  if (!table) return;
  const body = table.tBodies[0];
  const liveInserts = table.dataset.liveInserts === "true";
  const pageSize = Number(table.dataset.pageSize || 25);
  const empty = document.getElementById("no-calls");
  const summary = document.getElementById("calls-summary");

  function row(sid) {
    return body.querySelector(`tr[data-call-sid="${CSS.escape(sid)}"]`);
  }

  function v2vList(tr) {
    try { return JSON.parse(tr.dataset.v2v || "[]"); } catch { return []; }
  }

  function started(view) {
    if (!liveInserts || row(view.call_sid)) return;
    const tr = Live.clone("tpl-call-row");
    Object.assign(tr.dataset, { callSid: view.call_sid, started: view.started_at, v2v: "[]" });
    tr.dataset.live = "";
    const link = tr.querySelector(".f-number");
    link.href = `/calls/${encodeURIComponent(view.call_sid)}`;
    link.textContent = view.number;
    Live.setText(tr, ".f-direction", view.direction);
    const time = tr.querySelector(".f-started");
    time.setAttribute("datetime", view.started_at);
    time.textContent = new Date(view.started_at).toLocaleString();
    Live.setText(tr, ".f-duration", "0:00");
    Live.setText(tr, ".f-turns", "0");
    Live.setText(tr, ".f-median", "—");
    tr.classList.add("fresh");
    body.prepend(tr);
    while (body.rows.length > pageSize) body.deleteRow(body.rows.length - 1);
    if (empty) empty.hidden = true;
    if (summary) {
      const total = Number(summary.querySelector(".f-total").textContent) + 1;
      Live.setText(summary, ".f-total", total);
      Live.setText(summary, ".f-noun", total === 1 ? "call" : "calls");
    }
  }

  function spoke(view) {
    const tr = row(view.call_sid);
    if (!tr || view.role !== "caller") return;
    const cell = tr.querySelector(".f-turns");
    cell.textContent = String(Number(cell.textContent || 0) + 1);
  }

  function measured(view) {
    const tr = row(view.call_sid);
    if (!tr || view.v2v_ms == null) return;
    const values = v2vList(tr);
    values.push(view.v2v_ms);
    tr.dataset.v2v = JSON.stringify(values);
    Live.setText(tr, ".f-median", Live.formatMs(Live.median(values)));
  }

  function ended(view) {
    const tr = row(view.call_sid);
    if (!tr) return;
    delete tr.dataset.live;
    Live.setStatus(tr.querySelector(".f-status"), "completed");
    const seconds = (new Date(view.ended_at) - new Date(tr.dataset.started)) / 1000;
    if (Number.isFinite(seconds)) Live.setText(tr, ".f-duration", Live.formatDuration(seconds));
  }

  function refresh() {
    fetch(window.location.href, { credentials: "same-origin" })
      .then((response) => (response.ok ? response.text() : null))
      .then((html) => {
        if (!html) return;
        const doc = new DOMParser().parseFromString(html, "text/html");
        const fresh = doc.querySelector("#calls tbody");
        if (fresh) body.replaceChildren(...fresh.children);
        const freshSummary = doc.getElementById("calls-summary");
        if (summary && freshSummary) summary.replaceChildren(...freshSummary.childNodes);
        Live.localizeTimes(body);
        if (empty) empty.hidden = body.rows.length > 0;
      })
      .catch(() => {});
  }

  Live.stream("/events", {
    hello: refresh, // catch up on whatever happened while not connected
    call_started: started,
    utterance: spoke,
    metrics: measured,
    call_ended: ended,
  }, document.getElementById("live-note"));

  // Calls in progress: count their duration up.
  setInterval(() => {
    for (const tr of body.querySelectorAll("tr[data-live]")) {
      const seconds = (Date.now() - new Date(tr.dataset.started)) / 1000;
      if (Number.isFinite(seconds)) Live.setText(tr, ".f-duration", Live.formatDuration(seconds));
    }
  }, 1000);
})();
