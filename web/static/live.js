"use strict";
/* Shared by the viewer's pages. Fills the server's <template> markup from the view dicts that
   web/timeline.py makes, and keeps a call's transcript live from its SSE stream. The server
   decides what to show; this file only copies fields into the DOM and keeps items in order. */
(function () {
  const STATUS_ICONS = { "in-progress": "●", ringing: "●", completed: "✓", failed: "✗",
                         busy: "–", "no-answer": "–", canceled: "–" };

  function clone(id) {
    return document.getElementById(id).content.firstElementChild.cloneNode(true);
  }

  function setText(root, selector, text) {
    root.querySelectorAll(selector).forEach((el) => { el.textContent = text == null ? "" : String(text); });
  }

  function localTime(iso, withDate) {
    if (!iso) return "";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return "";
    return withDate ? date.toLocaleString() : date.toLocaleTimeString();
  }

  function localizeTimes(root) {
    root.querySelectorAll("time[datetime]").forEach((el) => {
      const text = localTime(el.getAttribute("datetime"), el.hasAttribute("data-date"));
      if (text) el.textContent = text;
    });
  }

  function setStatus(el, status) {
    el.className = `status status-${status} f-status`;
    el.replaceChildren();
    const icon = document.createElement("span");
    icon.setAttribute("aria-hidden", "true");
    icon.textContent = STATUS_ICONS[status] || "•";
    el.append(icon, ` ${status.replace("-", " ")}`);
  }

  function formatMs(ms) {
    return ms == null ? "—" : `${Math.round(ms).toLocaleString("en-US")} ms`;
  }

  function formatDuration(seconds) {
    const whole = Math.max(0, Math.round(seconds));
    return `${Math.floor(whole / 60)}:${String(whole % 60).padStart(2, "0")}`;
  }

  function median(values) {
    if (!values.length) return null;
    const sorted = [...values].sort((a, b) => a - b);
    const mid = Math.floor(sorted.length / 2);
    return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  }

  // -- transcript items ----------------------------------------------------------------
  function waterfall(m) {
    const el = clone("tpl-waterfall");
    el.dataset.turn = m.turn;
    setText(el, ".f-v2v", m.v2v);
    for (const bar of m.bars) {
      el.querySelectorAll(`[data-part="${bar.part}"]`).forEach((node) => {
        if (node.classList.contains("seg")) {
          node.style.width = `${bar.width}%`;
          return;
        }
        setText(node, ".f-value", bar.value);
        const line = node.querySelector(".bar");
        line.style.marginLeft = `${bar.left}%`;
        line.style.width = `${bar.width}%`;
      });
    }
    return el;
  }

  function utterance(u) {
    const el = clone("tpl-utterance");
    el.className = `item utt ${u.role}${u.interrupted ? " interrupted" : ""}`;
    Object.assign(el.dataset, { key: u.key, at: u.at, turn: u.turn, role: u.role });
    setText(el, ".f-who", u.who);
    const time = el.querySelector(".f-time");
    time.setAttribute("datetime", u.at);
    time.textContent = localTime(u.at) || u.time;
    setText(el, ".f-heard", u.heard);
    setText(el, ".f-unheard", u.unheard);
    el.querySelector(".f-badge").hidden = !u.interrupted;
    el.querySelector(".f-cut").hidden = !u.interrupted;
    el.querySelector(".f-unheard-wrap").hidden = !u.unheard;
    return el;
  }

  function pending(turn) {
    const el = clone("tpl-pending");
    Object.assign(el.dataset, { key: `p:${turn}`, turn });
    return el;
  }

  function callEvent(e) {
    const el = clone("tpl-event");
    el.className = `item ev${e.error ? " error" : ""}`;
    Object.assign(el.dataset, { key: e.key, at: e.at, type: e.type });
    setText(el, ".f-icon", e.icon);
    setText(el, ".f-label", e.label);
    setText(el, ".f-detail", e.detail);
    el.querySelector(".f-detail").hidden = !e.detail;
    const time = el.querySelector(".f-time");
    time.setAttribute("datetime", e.at);
    time.textContent = localTime(e.at) || e.time;
    return el;
  }

  /** One call's transcript list: items keyed by `data-key`, kept in time order. */
  class Timeline {
    constructor(list) {
      this.list = list;
      this.metrics = new Map();
      this.onChange = () => {};
    }

    find(key) {
      return this.list.querySelector(`[data-key="${CSS.escape(key)}"]`);
    }

    place(el) {
      const old = this.find(el.dataset.key);
      if (old) {
        const slot = el.querySelector(".latency-slot");
        const kept = old.querySelector(".waterfall");
        if (slot && kept && !slot.children.length) slot.append(kept);
        const shown = el.querySelector(".waterfall");
        if (shown && kept && kept.open) shown.open = true; // a resync keeps what the reader opened
        old.replaceWith(el);
        return;
      }
      const at = el.dataset.at;
      if (at) {
        for (const child of this.list.children) {
          if (!child.dataset.at || child.dataset.at > at) {
            this.list.insertBefore(el, child);
            return;
          }
        }
      }
      this.list.append(el);
    }

    attach(el, metrics) {
      const slot = el.querySelector(".latency-slot");
      if (!slot || !metrics) return;
      const open = slot.querySelector(".waterfall[open]") !== null;
      const fresh = waterfall(metrics);
      fresh.open = open;
      slot.replaceChildren(fresh);
    }

    apply(view) {
      if (view.kind === "utterance") {
        const el = utterance(view);
        if (view.role === "bot") {
          const placeholder = this.find(`p:${view.turn}`);
          const kept = placeholder && placeholder.querySelector(".waterfall");
          const metrics = view.metrics || this.metrics.get(view.turn);
          if (metrics) this.attach(el, metrics);
          else if (kept) el.querySelector(".latency-slot").append(kept);
          const shown = el.querySelector(".waterfall");
          if (shown && kept && kept.open) shown.open = true;
          if (placeholder) placeholder.remove();
        }
        this.place(el);
      } else if (view.kind === "metrics" || view.kind === "pending") {
        const metrics = view.kind === "metrics" ? view : view.metrics;
        if (metrics) this.metrics.set(view.turn, metrics);
        const bot = this.list.querySelector(`.utt.bot[data-turn="${view.turn}"]:not(.pending)`);
        if (bot) {
          if (metrics) this.attach(bot, metrics);
        } else {
          const el = pending(view.turn);
          this.attach(el, metrics);
          this.place(el);
        }
      } else if (view.kind === "event") {
        this.place(callEvent(view));
      } else {
        return;
      }
      this.onChange(view);
    }
  }

  /** An EventSource that comes back after errors; `hello` arrives on every (re)connect. */
  function stream(url, handlers, note) {
    let source = null;
    function connect() {
      source = new EventSource(url);
      for (const [kind, handler] of Object.entries(handlers)) {
        source.addEventListener(kind, (message) => handler(JSON.parse(message.data)));
      }
      source.addEventListener("hello", () => { if (note) note.textContent = "● live"; });
      source.addEventListener("error", () => {
        if (note) note.textContent = "○ reconnecting…";
        if (source.readyState === EventSource.CLOSED) setTimeout(connect, 5000);
      });
    }
    connect();
    return { close: () => source && source.close() };
  }

  /** Keep `list` in step with call `sid`; `hooks.onEnded(view)` when the call ends. */
  function followCall(sid, list, hooks = {}) {
    const timeline = new Timeline(list);
    const base = `/calls/${encodeURIComponent(sid)}`;
    if (hooks.onChange) timeline.onChange = hooks.onChange;
    function resync() {
      fetch(`${base}/timeline`, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then((response) => (response.ok ? response.json() : null))
        .then((data) => {
          if (!data) return;
          data.items.forEach((item) => timeline.apply(item));
          if (hooks.onCall) hooks.onCall(data.call);
        })
        .catch(() => {});
    }
    const apply = (view) => timeline.apply(view);
    const handle = stream(`${base}/events`, {
      hello: resync, // whatever happened while we were not connected
      utterance: apply,
      metrics: apply,
      event: apply,
      call_ended: (view) => { if (hooks.onEnded) hooks.onEnded(view); resync(); },
    }, hooks.note);
    return { timeline, close: handle.close };
  }

  window.Live = { clone, setText, setStatus, localizeTimes, formatMs, formatDuration, median,
                  stream, followCall, Timeline };
  document.addEventListener("DOMContentLoaded", () => localizeTimes(document));
})();
