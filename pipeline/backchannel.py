"""Barge-in that is right: telling an interruption from a backchannel, a cough or an echo.

While the bot talks, callers say "uh-huh", "yeah", "okay" to show they are listening; they
cough; a speakerphone feeds the bot's own voice back. None of that should stop the bot. A real
interruption ("actually, wait...", "hold on", "no, Tuesday") must stop it fast: Twilio `clear`
within 0.5 s of the caller's first sound.

`BargeInPolicy` decides from what is known at each moment (all in audio time):

1. Voice shorter than `candidate_ms` is never an interruption by itself.
2. From `candidate_ms` of voice, the words so far (a quick partial transcript) decide: real
   words → interrupt now; a backchannel, a filler, only function words ("and then": Whisper's
   guess at the start of a hum) or nothing recognisable → keep talking and look again every
   `recheck_ms` of further voice.
3. Voice still going `decide_within_ms` after onset stops the bot unless its words so far are
   a backchannel (or the bot's own echo); voice that goes on for `long_ms` (twice that while
   its words are a backchannel: "mm-hmm, mm-hmm") stops it whatever the words, unless they
   are the bot's own (echo the canceller left over). If such a sound then turns out to hold
   no words, the bot resumes (a false interruption, see `pipeline.resume`).
4. A partial transcript that does not arrive within `verdict_timeout_ms` counts as words:
   under load, fast interruptions win over perfect backchannel handling. Partial
   transcripts have their own queue (`Engines.partial_limiter`) and a fast path
   (`WhisperStt.transcribe_partial`), so they do not wait behind whole utterances.

When the sound ends before any of that, its final transcript decides between `backchannel`
(kept in the transcript, no reply, no stop) and `interruption` ("Stop." is short too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Interjection = Literal["backchannel", "noise", "echo", "words"]
BargeInClass = Literal["interruption", "backchannel", "noise", "echo", "false_interruption"]

BACKCHANNELS = frozenset(["yeah", "yes", "yep", "yup", "ya", "yea", "ok", "okay", "k", "right", "sure", "alright", "all", "fine", "good", "great", "cool", "nice", "uh", "huh", "uh-huh", "em", "emm", "eh", "ha", "hah", "haha", "heh", "hehe", "mhm", "mm-hmm", "mmhmm", "mm", "hmm", "hm", "um", "umm", "uhm", "ah", "oh", "aha", "ahh", "ooh", "wow", "er", "erm", "i", "see", "got", "it", "gotcha", "true", "totally", "exactly", "indeed", "definitely"])
# Whisper renders a closed-mouth hum ("mm-hmm") as a string of m/n/h letters, sometimes with
# an open vowel at the end ("Mma.", where the hum opens).
_HUM = re.compile(r"^(?:[mnh]+|[mnh]{2,}[ae])$")
# A partial transcript of a fraction of a second of a hum often comes out as a few function
# words ("and then", "in a"): too little to stop the bot for, so it is looked at again.
FUNCTION_WORDS = frozenset((
    "and", "then", "the", "a", "an", "in", "on", "of", "to", "for", "at", "by", "with", "from",
    "my", "our", "your", "his", "her", "its", "their", "me", "him", "them", "it", "is", "was",
    "be", "that", "this", "there", "so", "or", "as", "if",
))
_WORD = re.compile(r"[a-z']+|\d+")
# What Whisper makes of a short sound with no speech in it: a click, a scrape, a breath
# (tests/fixtures/click.wav, transcribed whole, is "You"). Alone, it is no interruption.
WHISPER_ON_NOISE = ["you"]


def classify_interjection(text: str) -> Interjection:
    """What a short sound made while the bot talked amounts to, from its transcript."""
    words = [w for w in _WORD.findall(text.lower()) if len(w) > 1 or w in "aiomnh"]
    if not words or words == WHISPER_ON_NOISE:
        return "noise"
    if all(w in BACKCHANNELS or _HUM.match(w) for w in words) and len(words) <= 4:
        return "backchannel"
    # A hum that Whisper spelled out letter by letter ("M-H-N.", "M-A-A-A-"), not a word.
    if all(len(w) == 1 for w in words) and len(words) <= 6:
        return "backchannel"
    return "words"


def echoes(text: str, bot_text: str) -> bool:
    """Are these words the bot's own, coming back (what the echo canceller left over)?

    Most of them (and at least two) occur in what the bot is saying; a word counts when it
    shares its first four letters with one of the bot's ("call" in "calling").
    """
    words = [w for w in _WORD.findall(text.lower()) if len(w) > 1]
    said = {w[:4] for w in _WORD.findall(bot_text.lower())}
    if len(words) < 2 or not said:
        return False
    return sum(w[:4] in said for w in words) >= 0.75 * len(words)


def partial_says_words(text: str) -> bool:
    """Does a partial transcript (the first fraction of a second) show real words yet?"""
    if classify_interjection(text) != "words":
        return False
    words = [w for w in _WORD.findall(text.lower()) if len(w) > 1 or w in "aiomnh"]
    return not all(w in FUNCTION_WORDS or w in BACKCHANNELS or _HUM.match(w) for w in words)


@dataclass(slots=True)
class BargeInPolicy:
    """Thresholds for deciding that the caller is interrupting (audio milliseconds)."""

    candidate_ms: int = 160  # voice before the words are looked at
    recheck_ms: int = 96  # look again after this much more voice
    long_ms: int = 704  # voice this long interrupts whatever it is
    verdict_timeout_ms: int = 120  # a partial transcript later than this counts as words
    decide_within_ms: int = 340  # from onset: still voicing then → stop (clear ≤ 0.5 s)
    # A sound over the bot that ended as a noise (no words in its transcript) and another
    # that starts within this much silence of it are one sound to the tracker: its onset is
    # the first one's and its voice adds up. Whisper hears nothing in a word's first syllable
    # alone, and "Ac-" (a dip) "-tually," (a comma) could otherwise go by as two noises.
    join_ms: int = 300


@dataclass(slots=True)
class BargeInTracker:
    """One sound heard while the bot speaks: when to ask for words, when to stop the bot.

    `feed(voiced_ms, now)` returns "transcribe" when a partial transcript is wanted and
    "interrupt" when the bot must stop; `partial(text, now)` gives the words.
    """

    policy: BargeInPolicy
    started_at: float
    bot_text: str = ""  # what the bot is saying: its own words coming back are not words
    carried_ms: float = 0.0  # voice of the noises it continues (`BargeInPolicy.join_ms`)
    asked_at_ms: float = -1.0
    asked_when: float | None = None
    words: str | None = None
    stopped: bool = False

    def feed(self, voiced_ms: float, now: float) -> Literal["transcribe", "interrupt"] | None:
        if self.stopped:
            return None
        p = self.policy
        voiced_ms += self.carried_ms
        if voiced_ms >= p.long_ms * (2 if self._backchannel else 1) and not self._echo:
            return self._stop()
        # However slow or unsure the words are (a loaded machine, a word Whisper cannot make
        # out yet), an interruption must not wait: voice still going this long after onset
        # stops the bot unless its words so far are a backchannel or the bot's own echo. If
        # it then holds no words, the bot resumes where the caller stopped hearing it.
        if (voiced_ms >= p.candidate_ms + p.recheck_ms and not self._echo
                and (now - self.started_at) * 1000 >= p.decide_within_ms
                and not self._listening):
            return self._stop()
        if self.asked_when is not None:  # a partial transcript is on its way
            if (now - self.asked_when) * 1000 + 1e-6 >= p.verdict_timeout_ms:
                return self._stop()
            return None
        if voiced_ms >= p.candidate_ms and (
            self.asked_at_ms < 0 or voiced_ms - self.asked_at_ms >= p.recheck_ms
        ):
            self.asked_at_ms = voiced_ms
            self.asked_when = now
            return "transcribe"
        return None

    def partial(self, text: str) -> Literal["interrupt"] | None:
        if self.stopped:
            return None
        self.words = text
        self.asked_when = None
        if self._says_words(text):
            return self._stop()
        return None

    @property
    def _backchannel(self) -> bool:
        """The latest words were a backchannel ("yeah", "mm"): the caller is listening."""
        return self.words is not None and classify_interjection(self.words) == "backchannel"

    @property
    def _listening(self) -> bool:
        """The latest words were a backchannel or only function words ("and then": Whisper's
        guess at the start of a hum): no sign of an interruption yet."""
        return self.words is not None and classify_interjection(self.words) in (
            "backchannel", "words")

    @property
    def _echo(self) -> bool:
        """The latest words were the bot's own: a long "voice" is its echo, not the caller."""
        return self.words is not None and echoes(self.words, self.bot_text)

    def _says_words(self, text: str) -> bool:
        return partial_says_words(text) and not echoes(text, self.bot_text)

    def _stop(self) -> Literal["interrupt"]:
        self.stopped = True
        return "interrupt"
