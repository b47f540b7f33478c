"use strict";
/* Call the bot from this browser, speaking the Twilio Media Streams protocol over
   WS /web/media: `connected`, `start` (customParameters direction=web), 20 ms μ-law `media`
   frames from the microphone, `stop` on hang-up. Like Twilio's player, the bot's audio is
   played in order, each `mark` is echoed once the audio before it has played (at once when
   nothing is queued), and `clear` stops all queued audio and echoes the pending marks. */
(function () {
  const RATE = 8000; // Twilio Media Streams: 8 kHz μ-law, mono
  const FRAME = 160; // 20 ms at 8 kHz
  const button = document.getElementById("talk-button");
  if (!button) return;
  const statusLine = document.getElementById("talk-status");
  const keypad = document.getElementById("keypad");
  const link = document.getElementById("talk-link");
  const list = document.getElementById("timeline");
  let call = null;
  let following = null; // the transcript of the latest call stays live after hang-up

  function hex(bytes) {
    return Array.from(crypto.getRandomValues(new Uint8Array(bytes)),
                      (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function toBase64(bytes) {
    let text = "";
    for (let i = 0; i < bytes.length; i += 1) text += String.fromCharCode(bytes[i]);
    return btoa(text);
  }

  function fromBase64(text) {
    const raw = atob(text);
    const out = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i += 1) out[i] = raw.charCodeAt(i);
    return out;
  }

  function setState(state, message) {
    button.dataset.state = state;
    Live.setText(button, ".f-label", state === "idle" ? "Start call" : "Hang up");
    button.disabled = state === "connecting";
    statusLine.textContent = message;
    keypad.hidden = state !== "live";
  }

  /** Linear-interpolating downsampler to 8 kHz, for browsers whose AudioContext will not
      run at 8 kHz. Carries its position and last sample across blocks. */
  class Downsampler {
    constructor(rate) {
      this.step = rate / RATE;
      this.pos = 0;
      this.last = 0;
    }

    push(input) {
      const out = [];
      let pos = this.pos;
      while (pos < input.length - 1) {
        const i = Math.floor(pos);
        const frac = pos - i;
        const a = i < 0 ? this.last : input[i];
        out.push(a + (input[i + 1] - a) * frac);
        pos += this.step;
      }
      this.pos = pos - input.length;
      this.last = input[input.length - 1];
      return Float32Array.from(out);
    }
  }

  /** Twilio's side of playback: queued audio, marks echoed once played, `clear`. */
  class Player {
    constructor(ctx, echo) {
      this.ctx = ctx;
      this.echo = echo;
      this.sources = new Set();
      this.nextTime = 0;
      this.marks = [];
      this.timer = null;
    }

    play(ulaw) {
      const samples = Mulaw.decode(ulaw);
      const buffer = this.ctx.createBuffer(1, samples.length, RATE);
      buffer.copyToChannel(samples, 0);
      const source = this.ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(this.ctx.destination);
      const at = Math.max(this.ctx.currentTime + 0.02, this.nextTime);
      source.start(at);
      this.nextTime = at + buffer.duration;
      this.sources.add(source);
      source.onended = () => this.sources.delete(source);
    }

    mark(name) {
      if (this.nextTime <= this.ctx.currentTime) {
        this.echo(name);
        return;
      }
      this.marks.push({ name, at: this.nextTime });
      this.schedule();
    }

    schedule() {
      if (this.timer !== null || !this.marks.length) return;
      const waitMs = Math.max(0, (this.marks[0].at - this.ctx.currentTime) * 1000);
      this.timer = setTimeout(() => { this.timer = null; this.flush(); }, waitMs + 5);
    }

    flush() {
      const now = this.ctx.currentTime;
      while (this.marks.length && this.marks[0].at <= now + 0.005) this.echo(this.marks.shift().name);
      this.schedule();
    }

    clear() {
      for (const source of this.sources) {
        try { source.stop(); } catch (_) { /* already stopped */ }
      }
      this.sources.clear();
      this.nextTime = 0;
      clearTimeout(this.timer);
      this.timer = null;
      const pending = this.marks;
      this.marks = [];
      pending.forEach((mark) => this.echo(mark.name)); // Twilio echoes pending marks on clear
    }
  }

  class WebCall {
    constructor() {
      this.callSid = `WB${hex(16)}`;
      this.streamSid = `MZ${hex(16)}`;
      this.seq = 0;
      this.chunk = 0;
      this.pending = new Float32Array(FRAME);
      this.filled = 0;
      this.ended = false;
    }

    send(message) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) {
        this.seq += 1;
        this.ws.send(JSON.stringify({ ...message, sequenceNumber: String(this.seq) }));
      }
    }

    async start() {
      this.mic = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
      try {
        this.ctx = new AudioContext({ sampleRate: RATE });
      } catch (_) {
        this.ctx = new AudioContext(); // runs at the device rate: resample below
      }
      await this.ctx.resume();
      this.down = this.ctx.sampleRate === RATE ? null : new Downsampler(this.ctx.sampleRate);
      this.player = new Player(this.ctx, (name) => this.send({
        event: "mark", streamSid: this.streamSid, mark: { name },
      }));
      await this.ctx.audioWorklet.addModule("/static/capture-worklet.js");
      const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
      this.ws = new WebSocket(`${scheme}//${window.location.host}/web/media`);
      this.ws.onopen = () => this.opened();
      this.ws.onmessage = (message) => this.received(JSON.parse(message.data));
      this.ws.onclose = (event) => this.closed(event);
    }

    opened() {
      this.send({ event: "connected", protocol: "Call", version: "1.0.0" });
      this.send({
        event: "start",
        streamSid: this.streamSid,
        start: {
          streamSid: this.streamSid,
          callSid: this.callSid,
          accountSid: "",
          tracks: ["inbound"],
          customParameters: { direction: "web" },
          mediaFormat: { encoding: "audio/x-mulaw", sampleRate: RATE, channels: 1 },
        },
      });
      const source = this.ctx.createMediaStreamSource(this.mic);
      this.node = new AudioWorkletNode(this.ctx, "capture");
      this.node.port.onmessage = (message) => this.captured(message.data);
      // Pulled through a muted gain so the graph runs without playing the microphone back.
      this.mute = this.ctx.createGain();
      this.mute.gain.value = 0;
      source.connect(this.node).connect(this.mute).connect(this.ctx.destination);
      link.querySelector("a").href = `/calls/${this.callSid}`;
      link.hidden = false;
      if (following) following.close();
      list.replaceChildren();
      following = Live.followCall(this.callSid, list, {});
      setState("live", "Connected: speak now");
    }

    captured(block) {
      const samples = this.down ? this.down.push(block) : block;
      for (let i = 0; i < samples.length; i += 1) {
        this.pending[this.filled] = samples[i];
        this.filled += 1;
        if (this.filled === FRAME) {
          this.filled = 0;
          this.chunk += 1;
          this.send({
            event: "media",
            streamSid: this.streamSid,
            media: { track: "inbound", chunk: String(this.chunk),
                     timestamp: String(this.chunk * 20), payload: toBase64(Mulaw.encode(this.pending)) },
          });
        }
      }
    }

    received(message) {
      if (message.event === "media") this.player.play(fromBase64(message.media.payload));
      else if (message.event === "mark") this.player.mark(message.mark.name);
      else if (message.event === "clear") this.player.clear();
    }

    dtmf(digit) {
      this.send({ event: "dtmf", streamSid: this.streamSid, dtmf: { track: "inbound_track", digit } });
    }

    hangUp() {
      this.send({ event: "stop", streamSid: this.streamSid,
                  stop: { accountSid: "", callSid: this.callSid } });
      if (this.ws) this.ws.close(1000);
      this.cleanUp("Call ended");
    }

    closed(event) {
      const reasons = { 1013: "The bot is busy or still starting. Try again shortly.",
                        1008: "Please log in again." };
      this.cleanUp(reasons[event.code] || "Call ended");
    }

    cleanUp(message) {
      if (this.ended) return;
      this.ended = true;
      if (this.player) this.player.clear();
      if (this.mic) this.mic.getTracks().forEach((track) => track.stop());
      if (this.ctx) this.ctx.close().catch(() => {});
      call = null;
      setState("idle", message);
    }
  }

  button.addEventListener("click", async () => {
    if (call) {
      call.hangUp();
      return;
    }
    call = new WebCall();
    setState("connecting", "Connecting…");
    try {
      await call.start();
    } catch (error) {
      const current = call;
      if (current) current.cleanUp(`Could not start: ${error.message || error}`);
    }
  });

  keypad.addEventListener("click", (event) => {
    const digit = event.target.closest("button[data-digit]");
    if (digit && call) call.dtmf(digit.dataset.digit);
  });

  window.addEventListener("pagehide", () => { if (call) call.hangUp(); });
})();
