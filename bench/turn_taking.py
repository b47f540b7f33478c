"""Turn-taking quality on the evaluation set in tests/fixtures/turns/, offline, on real models.

Each fixture is played through `pipeline.turn_taking.TurnTaking` (the same object the live
call uses) in audio time: 20 ms μ-law frames, real Silero VAD, real Whisper STT, real Smart
Turn. Model and STT results are delivered back on the audio timeline after the compute time
they really took here (one STT worker, one end-of-turn worker), so a slow model costs what it
would cost on a call. While the bot "speaks" (barge-in fixtures), its reply plays from t = 0
like Twilio's player would: paused by `PauseBot`, resumed where it stopped, and, for echo
fixtures, fed back into the caller's channel (delayed, filtered, attenuated) as it actually
plays, with the bot audio sent to the echo guard 200 ms ahead of playback as the playout does.

Three configurations, in the same run:
  silence  the baseline: 500 ms of silence ends a turn; any confirmed speech stops the bot
  cues     VAD silence + transcript cues (no end-of-turn model) + echo guard + backchannels
  smart    Smart Turn v3.2 + transcript cues + echo guard + backchannels (when installed)

Reported: false cut-off rate and EOU delay p50/p95 (turn fixtures); false barge-in rate on
noise, echo and backchannel fixtures; missed interruptions and barge-in → clear latency
(from the interruption's first sound); resume latency after a false interruption (from the
end of the sound, and from the verdict); preemptive replies started / used, and how long
before the end of the turn a used one was started (its head start).

    .venv/bin/python bench/turn_taking.py
    .venv/bin/python bench/turn_taking.py --modes silence smart --only digits_
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from media.audiofile import read_wav  # noqa: E402
from media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16  # noqa: E402
from media.vad import SileroSession, SileroVad  # noqa: E402
from pipeline.echo_guard import EchoGuard  # noqa: E402
from pipeline.engines import quick_transcriber  # noqa: E402
from pipeline.listener import EndpointConfig, Listener  # noqa: E402
from pipeline.turn_detector import SmartTurnModel, TurnDetector, smart_turn_model_path  # noqa: E402
from pipeline.turn_taking import (  # noqa: E402
    Analyze,
    Discard,
    PauseBot,
    Prepare,
    Transcribe,
    TurnEnded,
    TurnTaking,
    TurnTakingConfig,
)

FIXTURES = ROOT / "tests" / "fixtures" / "turns"
FRAME = 160  # 20 ms at 8 kHz
LEAD = 1600  # the playout keeps ≤ 200 ms queued ahead of the caller's ear
CHUNK = 800  # and sends 100 ms at a time
TAIL_S = 3.0  # silence after each fixture


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Models:
    vad: SileroSession
    stt: object
    turn: SmartTurnModel | None


@dataclass
class Bot:
    """The bot's reply as the caller hears it: played, paused, resumed."""

    audio: np.ndarray  # int16 at 8 kHz, after the μ-law round trip
    pos: int = 0
    sent: int = 0
    paused: bool = False
    pauses: list[float] = field(default_factory=list)
    resumes: list[float] = field(default_factory=list)
    heard_at_pause: list[int] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    dropped: bool = False

    @property
    def audible(self) -> bool:
        return not self.paused and not self.dropped and self.pos < self.audio.size


class OfflineCall:
    """One fixture through `TurnTaking`, on the audio timeline (see the module docstring)."""

    def __init__(self, fixture: dict, models: Models, mode: str, bot_audio: np.ndarray | None,
                 fixed_latency_ms: tuple[float, float] | None = None, bot_text: str = "",
                 resampler: str = "soxr", prepare_lead_ms: int | None = None):
        """`fixed_latency_ms` (STT, end-of-turn model): deliver results after these virtual
        compute times instead of the measured ones (deterministic, for tests)."""
        self.fixed = fixed_latency_ms
        self.fx = fixture
        self.mode = mode
        self.models = models
        listener = Listener(SileroVad(models.vad), EndpointConfig(resampler=resampler))  # type: ignore[arg-type]
        detector = None
        if mode != "silence":
            detector = TurnDetector(uses_model=mode == "smart")
            detector.expect_after(fixture.get("bot_said"))
        config = TurnTakingConfig(smart=mode != "silence")
        if prepare_lead_ms is not None:
            config = replace(config, prepare_lead_ms=prepare_lead_ms)
        self.turns = TurnTaking(listener, detector, config)
        if bot_audio is not None and bot_text:
            self.turns.bot_says(bot_text)
        self.guard = EchoGuard() if mode != "silence" else None
        self.bot = Bot(bot_audio) if bot_audio is not None else None
        self.echo = fixture.get("echo")
        self._echo_line = np.zeros(0, dtype=np.float32)
        self._queue: list[tuple[float, int, Callable[[], list]]] = []
        self._seq = itertools.count()
        self._stt_free_at = 0.0
        self._turn_free_at = 0.0
        self._generation = 0
        self.ended: list[TurnEnded] = []
        self.ended_at: list[float] = []
        self.prepared = 0
        self.prepared_used = 0
        self._prepared_live = False
        self._prepared_at = 0.0
        self.head_start_ms: list[float] = []  # per used preparation: how long before the end
        self.compute_ms: list[float] = []

    # Scheduling: results arrive after the compute time they took --------------------------
    def _schedule(self, at: float, fn: Callable[[], list]) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), fn))

    def _stt(self, audio: np.ndarray, now: float, deliver: Callable[[str, float], list],
             partial: bool = False) -> None:
        stt = self.models.stt
        transcribe = quick_transcriber(stt) if partial else stt.transcribe  # type: ignore[arg-type,attr-defined]
        start = time.perf_counter()
        text = transcribe(audio)
        took = time.perf_counter() - start if self.fixed is None else self.fixed[0] / 1000
        self.compute_ms.append(took * 1000)
        begin = max(now, self._stt_free_at)
        self._stt_free_at = begin + took
        generation = self._generation
        self._schedule(begin + took, lambda: deliver(text, generation))  # type: ignore[misc]

    def _eou(self, audio: np.ndarray, now: float) -> None:
        assert self.models.turn is not None
        start = time.perf_counter()
        probability = self.models.turn.predict(audio)
        took = time.perf_counter() - start if self.fixed is None else self.fixed[1] / 1000
        begin = max(now, self._turn_free_at)
        self._turn_free_at = begin + took
        generation = self._generation
        self._schedule(begin + took, lambda: ("eou", probability, generation))  # type: ignore[arg-type,return-value]

    # The run ------------------------------------------------------------------------------
    def run(self) -> dict:
        near = read_wav(FIXTURES / self.fx["file"], 8000).astype(np.float32) / 32768.0
        frames = near.size // FRAME + int(TAIL_S * 8000 / FRAME)
        near = np.concatenate([near, np.zeros(frames * FRAME - near.size, dtype=np.float32)])
        now = 0.0
        for index in range(frames):
            now = (index + 1) * FRAME / 8000
            frame = near[index * FRAME:(index + 1) * FRAME].copy()
            frame += self._bot_tick(now)
            pcm = ulaw_to_pcm16(pcm16_to_ulaw(np.clip(frame * 32768, -32768, 32767)
                                              .astype(np.int16)))
            if self.guard is not None:
                pcm = self.guard.process(pcm)
            self._deliver_due(now)
            audible = self.bot.audible if self.bot is not None else False
            self._act(self.turns.feed(pcm, now, audible), now)
        return self._result()

    def _bot_tick(self, now: float) -> np.ndarray:
        """Advance the bot's playback by one frame; returns the echo it makes (or zeros)."""
        out = np.zeros(FRAME, dtype=np.float32)
        bot = self.bot
        if bot is None:
            return out
        played = np.zeros(FRAME, dtype=np.float32)
        if bot.audible:
            chunk = bot.audio[bot.pos:bot.pos + FRAME].astype(np.float32) / 32768.0
            played[: chunk.size] = chunk
            bot.pos += FRAME
            while self.guard is not None and bot.sent < min(bot.audio.size, bot.pos + LEAD):
                self.guard.far_end(bot.audio[bot.sent:bot.sent + CHUNK], now)
                bot.sent += CHUNK
        if self.echo:
            delay = int(self.echo["delay_ms"] * 8)
            self._echo_line = np.concatenate([self._echo_line, played])
            need = delay + FRAME + len(self.echo["path"])
            if self._echo_line.size >= need:
                window = self._echo_line[-need:]
                filtered = np.convolve(window, self.echo["path"])[: window.size]
                out = filtered[-delay - FRAME: -delay if delay else None][:FRAME]
                out = out * 10 ** (self.echo["gain_db"] / 20)
            self._echo_line = self._echo_line[-(delay + FRAME + 64):]
        return out.astype(np.float32)

    def _deliver_due(self, now: float) -> None:
        while self._queue and self._queue[0][0] <= now:
            at, _, fn = heapq.heappop(self._queue)
            self._delivering_at = at
            result = fn()
            if isinstance(result, tuple):
                _, probability, generation = result
                if generation == self._generation:
                    self._act(self.turns.on_probability(probability, at), at)
            elif result:
                self._act(result, at)

    def _act(self, actions: list, now: float) -> None:
        for action in actions:
            if isinstance(action, Analyze):
                self._generation += 1
                generation = self._generation

                def deliver(text: str, _g: int, generation: int = generation) -> list:
                    if generation != self._generation:
                        return []
                    return self.turns.on_transcript(text, self._now_of_queue())

                # Over the bot, the words only have to tell a backchannel from words: the
                # fast path (as in `Conversation._analyze`).
                self._stt(action.audio, now, deliver, partial=action.during_bot)
                if self.models.turn is not None and self.mode == "smart":
                    self._eou(action.audio, now)
            elif isinstance(action, Discard):
                self._generation += 1
                self._prepared_live = False
            elif isinstance(action, Transcribe):
                self._stt(action.audio, now,
                          lambda text, _g: self.turns.on_partial(text, self._now_of_queue()),
                          partial=True)
            elif isinstance(action, PauseBot):
                if self.bot is not None and self.bot.audible:
                    self.bot.paused = True
                    self.bot.pauses.append(now)
                    self.bot.heard_at_pause.append(self.bot.pos)
                    self.bot.sent = self.bot.pos
            elif isinstance(action, Prepare):
                if not self._prepared_live:
                    self.prepared += 1
                    self._prepared_live = True
                    self._prepared_at = now
            elif isinstance(action, TurnEnded):
                self._ended(action, now)

    def _now_of_queue(self) -> float:
        return self._delivering_at

    _delivering_at = 0.0

    def _ended(self, action: TurnEnded, now: float) -> None:
        self.ended.append(action)
        self.ended_at.append(now)
        if self._prepared_live and action.interjection is None:
            self.prepared_used += 1
            self.head_start_ms.append(round((now - self._prepared_at) * 1000, 1))
        self._prepared_live = False
        bot = self.bot
        if bot is None or not bot.paused:
            return
        if action.interjection is not None and self.mode != "silence":
            bot.paused = False
            bot.resumes.append(now)
            bot.resumed_from.append(bot.pos)
        else:
            bot.dropped = True

    def _result(self) -> dict:
        fx = self.fx
        row: dict = {"name": fx["name"], "kind": fx["kind"], "category": fx.get("category"),
                     "expect": fx["expect"], "mode": self.mode,
                     "ended_at": [round(t, 3) for t in self.ended_at],
                     "reasons": [e.decision.reason for e in self.ended],
                     "transcripts": [e.decision.transcript for e in self.ended]}
        if fx["kind"] == "turn":
            end = fx["speech_end_s"]
            early = [t for t in self.ended_at if t < end - 0.05]
            late = [t for t in self.ended_at if t >= end - 0.05]
            row["cut_off"] = bool(early)
            row["eou_delay_ms"] = round((late[0] - end) * 1000, 1) if late else None
            row["prepared"] = self.prepared
            row["prepared_used"] = self.prepared_used
            row["head_start_ms"] = self.head_start_ms
            return row
        bot = self.bot
        assert bot is not None
        row["paused"] = bool(bot.pauses)
        row["resumed"] = bool(bot.resumes)
        row["dropped"] = bot.dropped
        row["interjections"] = [e.interjection for e in self.ended]
        if bot.pauses and fx.get("onset_s") is not None:
            row["clear_ms"] = round((bot.pauses[0] - fx["onset_s"]) * 1000, 1)
        if bot.resumes:
            row["resume_after_sound_ms"] = (
                round((bot.resumes[0] - fx["end_s"]) * 1000, 1) if fx.get("end_s") else None)
            row["resume_repeats_bytes"] = int(bot.heard_at_pause[0] - bot.resumed_from[0])
        return row


def mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


def summarize(rows: list[dict]) -> dict:
    turns = [r for r in rows if r["kind"] == "turn"]
    barge = [r for r in rows if r["kind"] == "barge"]
    delays = [r["eou_delay_ms"] for r in turns if r["eou_delay_ms"] is not None]
    head_starts = [h for r in turns for h in r.get("head_start_ms", [])]
    out: dict = {
        "turn_fixtures": len(turns),
        "false_cutoff_rate": (sum(r["cut_off"] for r in turns) / len(turns)) if turns else None,
        "false_cutoffs": [r["name"] for r in turns if r["cut_off"]],
        "eou_delay_p50_ms": percentile(delays, 0.5),
        "eou_delay_p95_ms": percentile(delays, 0.95),
        "eou_delay_mean_ms": mean(delays),
        "preemptive_started": sum(r.get("prepared", 0) for r in turns),
        "preemptive_used": sum(r.get("prepared_used", 0) for r in turns),
        # How long before the turn ended its reply was started: time the caller does not wait
        # (about nothing for a turn that looked complete at once: its evidence comes in just
        # before the end; up to the lead for one prepared before a long wait ran out).
        "preemptive_head_start_mean_ms": mean(head_starts),
        "preemptive_head_start_max_ms": max(head_starts, default=None),
    }
    for category in ("noise", "echo", "backchannel"):
        group = [r for r in barge if r["category"] == category and r["expect"] == "continue"]
        out[f"false_barge_in_{category}"] = (
            sum(r["paused"] for r in group) / len(group) if group else None)
        out[f"false_barge_in_{category}_names"] = [r["name"] for r in group if r["paused"]]
    real = [r for r in barge if r["expect"] == "interrupt"]
    clears = [r["clear_ms"] for r in real if r.get("clear_ms") is not None]
    out["interruptions"] = len(real)
    out["missed_interruptions"] = [r["name"] for r in real if not r["paused"] or r["resumed"]]
    out["clear_ms_p50"] = percentile(clears, 0.5)
    out["clear_ms_max"] = max(clears) if clears else None
    out["clear_within_500ms"] = sum(c <= 500 for c in clears)
    resumes = [r["resume_after_sound_ms"] for r in barge
               if r.get("resume_after_sound_ms") is not None]
    out["false_interruptions_resumed"] = len(resumes)
    out["resume_after_sound_ms_p50"] = percentile(resumes, 0.5)
    out["resume_after_sound_ms_max"] = max(resumes) if resumes else None
    out["resume_repeated_bytes_max"] = max(
        (r["resume_repeats_bytes"] for r in barge if "resume_repeats_bytes" in r), default=None)
    out["stopped_and_never_resumed"] = [
        r["name"] for r in barge if r["expect"] != "interrupt" and r["paused"] and not r["resumed"]]
    return out


def fmt(value: object, pct: bool = False) -> str:
    if value is None:
        return "–"
    if pct:
        return f"{100 * float(value):.1f} %"  # type: ignore[arg-type]
    if isinstance(value, float):
        return f"{value:.0f}"
    return str(value)


def print_table(summaries: dict[str, dict]) -> None:
    modes = list(summaries)
    lines = [
        ("false cut-off rate", "false_cutoff_rate", True),
        ("EOU delay p50 (ms)", "eou_delay_p50_ms", False),
        ("EOU delay p95 (ms)", "eou_delay_p95_ms", False),
        ("false barge-in: noise", "false_barge_in_noise", True),
        ("false barge-in: echo", "false_barge_in_echo", True),
        ("false barge-in: backchannel", "false_barge_in_backchannel", True),
        ("real barge-in → clear p50 (ms)", "clear_ms_p50", False),
        ("real barge-in → clear max (ms)", "clear_ms_max", False),
        ("interruptions cleared ≤ 500 ms", "clear_within_500ms", False),
        ("missed interruptions", "missed_interruptions", False),
        ("resume after sound p50 (ms)", "resume_after_sound_ms_p50", False),
        ("resume after sound max (ms)", "resume_after_sound_ms_max", False),
        ("preemptive replies started/used", None, False),
        ("head start of a used one mean (ms)", "preemptive_head_start_mean_ms", False),
        ("head start of a used one max (ms)", "preemptive_head_start_max_ms", False),
    ]
    print(f"\n{'':34s}" + "".join(f"{m:>14s}" for m in modes))
    for label, key, pct in lines:
        cells = []
        for m in modes:
            s = summaries[m]
            if key is None:
                cells.append(f"{s['preemptive_started']}/{s['preemptive_used']}")
            elif key == "missed_interruptions":
                cells.append(f"{len(s[key])}/{s['interruptions']}")
            elif key == "clear_within_500ms":
                cells.append(f"{s[key]}/{s['interruptions']}")
            else:
                cells.append(fmt(s[key], pct))
        print(f"{label:34s}" + "".join(f"{c:>14s}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["silence", "cues", "smart"])
    parser.add_argument("--only", default="", help="run fixtures whose name contains this")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "turn_taking.json"))
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--vad-rate", type=int, choices=[8000, 16000], default=8000,
                        help="the VAD's sample rate (the VAD_RATE setting)")
    parser.add_argument("--resampler", choices=["soxr", "halfband"], default="soxr",
                        help="at --vad-rate 16000, 8 -> 16 kHz for the VAD (VAD_RESAMPLER)")
    parser.add_argument("--prepare-lead-ms", type=int, default=None,
                        help="TurnTakingConfig.prepare_lead_ms (default: its default; 0: "
                             "prepare only turns that look complete)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from pipeline.stt import WhisperStt

    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    fixtures = [f for f in manifest["fixtures"] if args.only in f["name"]]
    bot_audio = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(FIXTURES / manifest["bot_reply"]["file"],
                                                     8000)))
    turn_model = SmartTurnModel() if smart_turn_model_path() is not None else None
    if turn_model is None and "smart" in args.modes:
        print("Smart Turn is not installed (pip install --no-deps pipecat-ai): skipping 'smart'")
        args.modes = [m for m in args.modes if m != "smart"]
    models = Models(SileroSession(rate=args.vad_rate), WhisperStt(), turn_model)
    models.stt.transcribe(np.zeros(16000, dtype=np.float32))  # type: ignore[attr-defined]
    rows: list[dict] = []
    summaries: dict[str, dict] = {}
    started = time.perf_counter()
    for mode in args.modes:
        mode_rows = []
        for fixture in fixtures:
            call = OfflineCall(fixture, models, mode,
                               bot_audio if fixture["kind"] == "barge" else None,
                               bot_text=manifest["bot_reply"]["text"],
                               resampler=args.resampler,
                               prepare_lead_ms=args.prepare_lead_ms)
            row = call.run()
            mode_rows.append(row)
            if args.verbose:
                print(mode, json.dumps(row))
        rows += mode_rows
        summaries[mode] = summarize(mode_rows)
    print_table(summaries)
    for mode, s in summaries.items():
        print(f"\n{mode}: cut-offs {s['false_cutoffs']}; missed {s['missed_interruptions']}; "
              f"false barge-ins {s['false_barge_in_noise_names'] + s['false_barge_in_echo_names'] + s['false_barge_in_backchannel_names']}")
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "fixtures": len(fixtures),
              "modes": args.modes, "vad_rate": args.vad_rate, "resampler": args.resampler,
              "prepare_lead_ms": (args.prepare_lead_ms if args.prepare_lead_ms is not None
                                  else TurnTakingConfig().prepare_lead_ms),
              "seconds": round(time.perf_counter() - started, 1),
              "summary": summaries, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
