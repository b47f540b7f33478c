"""Turn-taking for one call: who has the floor, decided on audio time.

`TurnTaking` sits between the caller's audio and the conversation. It runs the `Listener`
(VAD endpointing), the `TurnDetector` (end of turn from the model and the words) and, while the
bot is audible, a `BargeInTracker` (interruption or backchannel), and answers each frame with
`Action`s for the conversation to carry out: start the speculative analysis of a pause, drop
it, transcribe a possible interruption, pause the bot, prepare a reply early, end the turn.
Model and STT results come back through `on_probability`, `on_transcript` and `on_partial`.

It is synchronous and counts audio time (`now` is passed in), so `bench/turn_taking.py` drives
the very same decisions offline, and `smart=False` gives the silence-only baseline (the
listener's fixed silence ends the turn, any confirmed speech over the bot stops it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from pipeline.backchannel import (
    BargeInPolicy,
    BargeInTracker,
    Interjection,
    classify_interjection,
    echoes,
)
from pipeline.listener import (
    Listener,
    SpeechConfirmed,
    SpeechEnded,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
)
from pipeline.turn_detector import TurnDecision, TurnDetector


@dataclass(frozen=True, slots=True)
class Analyze:
    """A pause began: transcribe the audio so far (and score it with the end-of-turn model)."""

    audio: np.ndarray
    last_voice_at: float
    during_bot: bool
    pause_id: int  # pass back with the results: a later pause makes them stale


@dataclass(frozen=True, slots=True)
class Discard:
    """The caller went on: the pause's analysis and any reply prepared from it are stale."""


@dataclass(frozen=True, slots=True)
class SpeechBegan:
    """The caller is talking (confirmed) while the bot is not audible: a reply still being
    made for an earlier turn waits for this one."""

    onset_at: float


@dataclass(frozen=True, slots=True)
class Transcribe:
    """A sound over the bot needs a quick partial transcript to tell words from a backchannel."""

    audio: np.ndarray
    utterance_id: int  # pass back with the words


@dataclass(frozen=True, slots=True)
class PauseBot:
    """Stop the bot now (`clear`), keeping the rest of its reply in case this was no words."""

    onset_at: float
    voiced_ms: float
    partial: str | None


@dataclass(frozen=True, slots=True)
class Prepare:
    """Start the reply to these words now and speak it when the turn ends (if it ends on them):
    at once when they look like a complete turn, or `prepare_lead_ms` before a long wait for
    more runs out (see `TurnTakingConfig`)."""

    text: str


@dataclass(frozen=True, slots=True)
class TurnEnded:
    """The caller's utterance is over.

    `during_bot`: it began while the bot was audible. `interjection`: set when it was judged
    from its transcript not to be words for the bot to answer (a backchannel or a noise);
    then a bot paused for it resumes and nothing is replied.
    """

    speech: SpeechEnded
    decision: TurnDecision
    during_bot: bool
    paused_bot: bool
    interjection: Interjection | None = None


Action = Analyze | Discard | SpeechBegan | Transcribe | PauseBot | Prepare | TurnEnded


@dataclass(slots=True)
class TurnTakingConfig:
    smart: bool = True  # False: the silence-only baseline
    interjection_pause_ms: int = 128  # a sound over the bot is judged after this much silence
    barge_in: BargeInPolicy = field(default_factory=BargeInPolicy)
    # A pause whose evidence says "more may come" (the model hears an unfinished turn, a
    # trailing "and", digits being dictated) waits up to 2 s; a caller who lets that wait run
    # has usually finished, and then hears nothing for the wait plus the whole reply's start.
    # So the reply is prepared this long before the wait runs out (about what the first
    # sentence takes to be spoken), and is thrown away if the caller goes on. 0: only turns
    # that look complete are prepared.
    prepare_lead_ms: int = 700


class TurnTaking:
    """One call's turn-taking decisions (see the module docstring)."""

    def __init__(self, listener: Listener, detector: TurnDetector | None,
                 config: TurnTakingConfig | None = None) -> None:
        self.config = config or TurnTakingConfig()
        # Deciding from the model and the words needs them at each pause: with speculative
        # transcription switched off (speculative_ms=0) the listener's silence decides alone.
        self.smart = (self.config.smart and detector is not None
                      and bool(listener.config.speculative_ms))
        self.detector = detector or TurnDetector(uses_model=False)
        if self.smart:
            # The detector ends turns; the listener's own silence is only the outer bound. The
            # evidence is gathered from a shorter first pause, so it is in when it is needed.
            bound = self.detector.policy.max_ms + 100
            speculative = min(listener.config.speculative_ms, 160)
            listener.config = replace(listener.config, speculative_ms=speculative,
                                      silence_ms=max(listener.config.silence_ms, bound))
        # Windows that wait in the caller's speech (`feed`) must not move a decision made on
        # silence here: the interjection pause, the end-of-turn budgets.
        listener.limit_hold(min(self.config.interjection_pause_ms,
                                self.detector.policy.shortest_ms()))
        self.listener = listener
        self._during_bot = False
        self._tracker: BargeInTracker | None = None
        self._paused_bot = False
        self._analyzing = False
        self._onset_at = 0.0
        self.pause_id = 0
        self.utterance_id = 0
        self._prepared_for = -1
        self._bot_lines: list[str] = []
        # The last sound over the bot that ended as a noise without pausing it: (onset, last
        # voice, voiced ms, carried included), for a sound that follows it closely
        # (`BargeInPolicy.join_ms`).
        self._noise: tuple[float, float, float] | None = None

    @property
    def paused_bot(self) -> bool:
        return self._paused_bot

    def bot_says(self, text: str) -> None:
        """The bot is about to play `text`: its own words, should they come back as echo."""
        self._bot_lines = [*self._bot_lines[-3:], text]
        if self._tracker is not None:
            self._tracker.bot_text = self.bot_text

    @property
    def bot_text(self) -> str:
        return " ".join(self._bot_lines)

    def interjection(self, text: str) -> Interjection:
        """What a sound over the bot amounts to: its words, a backchannel, noise, or echo."""
        kind = classify_interjection(text)
        if kind == "words" and echoes(text, self.bot_text):
            return "echo"
        return kind

    # Audio ---------------------------------------------------------------------------------
    def feed(self, pcm8k: np.ndarray, now: float, bot_audible: bool) -> list[Action]:
        """One frame of caller audio (8 kHz int16, echo already removed) at audio time `now`."""
        actions: list[Action] = []
        # Windows may wait in the caller's speech (the listener's `hold`), except over the
        # bot: a barge-in is judged on the caller's voiced time as it grows.
        hold = not bot_audible and self._tracker is None
        for event in self.listener.feed(pcm8k, now, hold):
            if isinstance(event, SpeechStarted):
                self._start(event.at, bot_audible)
            elif isinstance(event, SpeechConfirmed):
                self._confirmed(event, actions)
            elif isinstance(event, SpeechPaused):
                self._pause(event.audio, event.last_voice_at, actions)
            elif isinstance(event, SpeechResumed):
                self._analyzing = False
                self.pause_id += 1
                self.detector.resume()
                actions.append(Discard())
            elif isinstance(event, SpeechEnded):
                actions.append(self._ended(event, "max_silence"))
        listener = self.listener
        if not listener.in_speech:
            return actions
        if self._tracker is not None and self.smart:
            verdict = self._tracker.feed(listener.voiced_ms, now)
            if verdict == "transcribe":
                actions.append(Transcribe(listener.audio(), self.utterance_id))
            elif verdict == "interrupt":
                actions.append(self._pause_bot())
        if (self._during_bot and self.smart and not self._analyzing
                and listener.silence_ms >= self.config.interjection_pause_ms
                and listener.voiced_ms >= listener.config.min_utterance_ms):
            self._pause(listener.audio(), listener.last_voice_at, actions)
        if self.smart:
            actions.extend(self._prepare_if_due())
            actions.extend(self._end_if_due(now))
        return actions

    def waits_for_windows(self, bot_audible: bool) -> bool:
        """True when `feed` decides nothing until the listener scores another window: the bot
        is not audible and no barge-in is being judged. Every other decision in `feed` is
        made on the listener's events, or on its silence, which only grows with windows;
        results that come in between (a transcript, the model's verdict) are acted on as
        they arrive (`_evidence_in`). Only a barge-in's tracker looks at the clock."""
        return not bot_audible and self._tracker is None

    def _start(self, at: float, bot_audible: bool) -> None:
        self.utterance_id += 1
        self._during_bot = bot_audible
        self._paused_bot = False
        self._analyzing = False
        self._onset_at = at
        self.detector.resume()
        self.detector.words_required = bot_audible and self.smart
        self._tracker = None
        noise, self._noise = self._noise, None
        if bot_audible:
            self._tracker = BargeInTracker(self.config.barge_in, at, self.bot_text)
            if noise is not None and (at - noise[1]) * 1000 <= self.config.barge_in.join_ms:
                # It goes on from a noise just before it: one sound, from the first onset.
                self._onset_at = self._tracker.started_at = noise[0]
                self._tracker.carried_ms = noise[2]

    def _confirmed(self, event: SpeechConfirmed, actions: list[Action]) -> None:
        if not self._during_bot:
            actions.append(SpeechBegan(event.onset_at))
        elif not self.smart:
            actions.append(self._pause_bot())  # the baseline: any confirmed speech stops it

    def _pause(self, audio: np.ndarray, last_voice_at: float, actions: list[Action]) -> None:
        if self._analyzing:
            return
        self._analyzing = True
        self.pause_id += 1
        self.detector.pause(last_voice_at)
        actions.append(Analyze(audio, last_voice_at, self._during_bot, self.pause_id))

    def _pause_bot(self) -> PauseBot:
        self._paused_bot = True
        words = self._tracker.words if self._tracker is not None else None
        if self._tracker is not None:
            self._tracker.stopped = True
        return PauseBot(self._onset_at, self.listener.voiced_ms, words)

    # Results -------------------------------------------------------------------------------
    def on_probability(self, probability: float, now: float,
                       pause_id: int | None = None) -> list[Action]:
        if not self._analyzing or pause_id not in (None, self.pause_id):
            return []
        self.detector.add_probability(probability)
        return self._evidence_in(now)

    def on_transcript(self, text: str, now: float, pause_id: int | None = None) -> list[Action]:
        """The speculative transcript of the current pause."""
        if (not self._analyzing or not self.listener.in_speech
                or pause_id not in (None, self.pause_id)):
            return []
        actions: list[Action] = []
        if self._during_bot and self.smart:
            kind = self.interjection(text)
            if kind != "words":
                # A backchannel or a noise: judged now, not after an end-of-turn wait, so a
                # bot paused for it resumes at once.
                speech = self.listener.end_turn(now)
                if speech is not None:
                    self.detector.add_transcript(text)
                    actions.append(self._ended(speech, "interjection"))
                return actions
            if not self._paused_bot:
                actions.append(self._pause_bot())  # "Stop." is short, and it is words
        self.detector.add_transcript(text)
        return self._evidence_in(now)

    def on_partial(self, text: str, now: float, utterance_id: int | None = None
                   ) -> list[Action]:
        """A quick transcript of a sound over the bot, asked for by `Transcribe`."""
        if (self._tracker is None or not self.listener.in_speech
                or utterance_id not in (None, self.utterance_id)):
            return []
        if self._tracker.partial(text) == "interrupt":
            return [self._pause_bot()]
        return []

    def _evidence_in(self, now: float) -> list[Action]:
        """A result came in: prepare the reply if that is due now, end the turn if due."""
        actions = self._prepare_if_due()
        actions.extend(self._end_if_due(now))
        return actions

    def _prepare_if_due(self) -> list[Action]:
        """`Prepare` the reply to this pause's words, once: at once when they look like a
        complete turn, else when the wait for more is `prepare_lead_ms` from running out."""
        text = self.detector.transcript
        if (not self.smart or self._during_bot or not self._analyzing
                or self._prepared_for == self.pause_id or not text or not text.strip()):
            return []
        decision = self.detector.decision()
        lead = self.config.prepare_lead_ms
        if (decision.reason not in ("model_complete", "words_complete", "answer")
                and (not lead or self.listener.silence_ms + lead < decision.budget_ms)):
            return []
        self._prepared_for = self.pause_id
        return [Prepare(text)]

    def _end_if_due(self, now: float) -> list[Action]:
        listener = self.listener
        if not self.smart or not listener.in_speech or not self.detector.due(listener.silence_ms):
            return []
        speech = self.listener.end_turn(now)
        if speech is None:
            return []
        return [self._ended(speech, None)]

    def _ended(self, speech: SpeechEnded, reason: str | None) -> TurnEnded:
        decision = self.detector.decision()
        if reason is not None and self.smart:
            decision = replace(decision, reason=reason)
        elif not self.smart:
            decision = replace(decision, reason="silence",
                               budget_ms=self.listener.config.silence_ms)
        interjection: Interjection | None = None
        if self._during_bot and self.smart:
            if not speech.worth_transcribing:
                interjection = "noise"
            elif decision.transcript is not None:
                kind = self.interjection(decision.transcript)
                interjection = None if kind == "words" else kind
        ended = TurnEnded(speech, decision, self._during_bot, self._paused_bot, interjection)
        if interjection == "noise" and not self._paused_bot and self._tracker is not None:
            self._noise = (self._onset_at, speech.last_voice_at,
                           self._tracker.carried_ms + speech.voiced_ms)
        self._analyzing = False
        self.pause_id += 1
        self._tracker = None
        self.detector.resume()
        return ended
