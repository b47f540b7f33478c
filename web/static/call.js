"use strict";
/* One call's page, live: the transcript follows the call; status, duration and turn counts
   update as it goes on and when it ends. */
(function () {
  const list = document.getElementById("timeline");
  if (!list) return;
  const meta = document.getElementById("call-meta");
  const status = document.querySelector("#call-status .f-status");
  const empty = document.getElementById("no-items");

  function showCall(call) {
    if (status) Live.setStatus(status, call.status);
    Live.setText(meta, ".f-duration", call.duration || "—");
    Live.setText(meta, ".f-reason", call.end_reason || "—");
    Live.setText(meta, ".f-turns", call.turns);
    Live.setText(meta, ".f-median", call.median_v2v);
  }

  Live.followCall(list.dataset.callSid, list, {
    note: document.getElementById("live-note"),
    onCall: showCall,
    onChange: (view) => {
      if (empty) empty.hidden = true;
      if (view.kind === "utterance" && view.role === "caller") {
        const turns = meta.querySelector(".f-turns");
        turns.textContent = String(list.querySelectorAll(".utt.caller").length);
      }
    },
    onEnded: (view) => {
      if (status) Live.setStatus(status, "completed");
      Live.setText(meta, ".f-reason", view.reason || "—");
    },
  });
})();
