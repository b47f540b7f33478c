"""End of turn: deciding when the caller has finished, from more than silence.

Three kinds of evidence, gathered at the caller's first pause (the listener's `SpeechPaused`):

- the audio itself, scored by Smart Turn v3.2 (`SmartTurnModel`: a small Whisper-encoder
  classifier, BSD-2, ONNX, 8 s of 16 kHz audio in, P(finished) out; ~45 ms on one CPU core).
  It ships inside the `pipecat-ai` wheel, installed without its dependencies (the `turn`
  extra); when it is absent, the transcript cues alone decide (and silence bounds them);
- the speculative transcript of the audio so far (`transcript_cue`): a trailing "and", "to",
  "uh" or "..." means the caller is mid-thought; a digit group that cannot be a whole phone
  number yet means they are dictating (entity mode);
- what the bot just asked (`expected_entity`): after "what's your phone number?" the turn is
  held until the digits look complete; after a yes/no question a bare "yes" ends it at once.

`EndOfTurnPolicy` turns the evidence into a silence budget (how long after the last voiced
window the turn ends); `TurnDetector` holds one pause's evidence and says when that budget is
spent. Both are synchronous and count audio time, so the offline benchmark and the live call
make the same decisions.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import numpy as np

SAMPLE_RATE = 16000
WINDOW_S = 8  # Smart Turn looks at the last 8 s (left-padded with zeros when shorter)
MODEL_FILE = "smart-turn-v3.2-cpu.onnx"

# Whisper-style log-mel front end (what Smart Turn v3 was trained on): 25 ms Hann windows every
# 10 ms, 80 Slaney mel bands, log10, clamped to 8 decades below the peak, scaled to ~[-1, 1].
N_FFT = 400
HOP = 160
N_MELS = 80


def smart_turn_model_path() -> Path | None:
    """Smart Turn's ONNX file inside an installed `pipecat-ai` (None when not installed).

    Found with `find_spec`, which does not import `pipecat` (its package imports need
    dependencies we do not install).
    """
    spec = find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "audio" / "turn" / "smart_turn" / "data" / MODEL_FILE
        if path.is_file():
            return path
    return None


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = 3.0 * hz / 200.0
    log_region = hz >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) * 27.0 / np.log(6.4),
                    mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = 200.0 * mel / 3.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)


def _mel_filters() -> np.ndarray:
    """Slaney-normalized triangular filters, shape (N_FFT // 2 + 1, N_MELS)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    bins = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    slopes = edges[None, :] - bins[:, None]
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


_FILTERS = _mel_filters()
_HANN = np.hanning(N_FFT + 1)[:-1]  # periodic, like torch.hann_window


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper's log-mel features of exactly `WINDOW_S` seconds: float32 (80, 800)."""
    n = SAMPLE_RATE * WINDOW_S
    x = np.asarray(audio, dtype=np.float32)[:n]
    if x.size < n:
        x = np.pad(x, (0, n - x.size))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * _HANN, axis=-1)) ** 2  # (801, 201)
    mel = np.log10(np.maximum(power @ _FILTERS, 1e-10)).T[:, :-1]
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


def last_window(audio: np.ndarray) -> np.ndarray:
    """The last `WINDOW_S` seconds, left-padded with silence when shorter."""
    n = SAMPLE_RATE * WINDOW_S
    audio = np.asarray(audio, dtype=np.float32)
    return audio[-n:] if audio.size >= n else np.pad(audio, (n - audio.size, 0))


class SmartTurnModel:
    """Smart Turn v3.2: P(the speaker has finished their turn) from the audio so far.

    One instance serves every call (onnxruntime sessions are thread-safe); `predict` is
    blocking (~45 ms on one core), so the conversation runs it in a worker thread.
    """

    name = "smart-turn-v3.2"

    def __init__(self, path: Path | str | None = None, threads: int = 1) -> None:
        import onnxruntime

        path = path or smart_turn_model_path()
        if path is None:
            raise FileNotFoundError(
                "Smart Turn is not installed: pip install --no-deps pipecat-ai (the turn extra)")
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = threads
        options.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            str(path), providers=["CPUExecutionProvider"], sess_options=options)

    def predict(self, audio16k: np.ndarray) -> float:
        features = log_mel(last_window(audio16k))[None]
        (probability,) = self._session.run(None, {"input_features": features})
        return float(np.asarray(probability).reshape(-1)[0])


_shared: dict[str, SmartTurnModel | None] = {}
_shared_lock = threading.Lock()


def shared_smart_turn() -> SmartTurnModel | None:
    """The process's Smart Turn model, loaded on first use; None when it is not installed.

    Called where engines are built (the app lifespan, test fixtures), never at import.
    """
    with _shared_lock:
        if "model" not in _shared:
            path = smart_turn_model_path()
            _shared["model"] = SmartTurnModel(path) if path is not None else None
        return _shared["model"]


# Transcript cues ------------------------------------------------------------------------------

Cue = Literal["complete", "hesitation", "unfinished", "entity", "answer", "greeting"]
Entity = Literal["phone", "zip", "number", "email", "birthdate", "date", "spelling"]

FILLERS = frozenset({"uh", "um", "uhm", "umm", "er", "erm", "ah", "hmm", "mm", "like"})
# Words a sentence rarely ends on: conjunctions, prepositions, articles, possessives, auxiliaries.
CONTINUATIONS = frozenset(["and", "but", "or", "so", "because", "cause", "since", "if", "then", "than", "that", "which", "who", "whose", "where", "when", "while", "whether", "to", "of", "for", "from", "with", "without", "at", "in", "on", "into", "onto", "by", "about", "as", "like", "per", "via", "the", "a", "an", "my", "your", "our", "their", "his", "her", "its", "this", "these", "those", "some", "any", "another", "is", "are", "was", "were", "am", "be", "been", "being", "do", "does", "did", "have", "has", "had", "will", "would", "can", "could", "should", "shall", "may", "might", "must", "i'm", "we", "he", "she", "they", "gonna", "wanna"])
NUMBER_WORDS = {"zero": "0", "oh": "0", "o": "0", "one": "1", "two": "2", "three": "3",
                "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
                "double": "", "triple": ""}
HESITATION_PHRASES = ("let me see", "let me think", "i think", "i guess", "i mean", "you know",
                      "well", "hang on", "one second", "just a second")
PHONE_GROUPS = (3, 6, 8, 9)  # digits so far of a 3-3-4 number that is not finished
_YEAR = re.compile(r"\b(19|20)\d\d\b|\b(nineteen|twenty|two thousand)\b", re.I)
_DAY = re.compile(r"\b\d{1,2}(st|nd|rd|th)?\b|\b(first|second|third|fourth|fifth|sixth|seventh|"
                  r"eighth|ninth|tenth|eleventh|twelfth|\w+teenth|twentieth|thirtieth|today|"
                  r"tomorrow|monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b", re.I)
# "Hi there." / "Hello?" alone: a caller who greets the bot nearly always goes on with why they
# called, after a breath ("Hi there. What time do you open?"), so it is no turn of its own.
GREETINGS = frozenset({"hi", "hello", "hey", "hiya", "howdy", "morning", "afternoon", "evening"})
GREETING_WORDS = GREETINGS | {"there", "good", "oh", "yes", "yeah", "um", "uh"}
SHORT_ANSWERS = frozenset({"yes", "no", "yeah", "yep", "nope", "sure", "okay", "ok", "correct",
                           "right", "exactly", "absolutely", "please", "thanks"})
ENTITY_PROMPTS: list[tuple[Entity, re.Pattern[str]]] = [
    ("phone", re.compile(r"\b(phone|mobile|cell|call ?back|contact) ?(number)?\b", re.I)),
    ("email", re.compile(r"\be-?mail\b", re.I)),
    ("spelling", re.compile(r"\bspell", re.I)),
    ("birthdate", re.compile(r"\b(birth|birthday)\b", re.I)),
    ("date", re.compile(r"\b(date|birthday|date of birth|what day|which day)\b", re.I)),
    ("zip", re.compile(r"\b(zip|post ?code|postal code)\b", re.I)),
    ("number", re.compile(r"\b(number|zip|post ?code|account|order|card|pin|code)\b", re.I)),
]
_WORD = re.compile(r"[a-z0-9']+")


def expected_entity(bot_text: str | None) -> Entity | None:
    """What the bot's last words asked the caller to dictate, if anything."""
    if not bot_text:
        return None
    # Only the last sentence counts: "Thanks! What's your phone number?"
    last = re.split(r"(?<=[.!])\s+", bot_text.strip())[-1]
    for entity, pattern in ENTITY_PROMPTS:
        if pattern.search(last):
            return entity
    return None


def asked_question(bot_text: str | None) -> bool:
    return bool(bot_text) and bot_text.rstrip().endswith("?")  # type: ignore[union-attr]


def digits_of(text: str) -> str:
    """The digits dictated at the end of `text` ("555 867 oh one" → "5558670 1" → "55586701")."""
    tokens = _WORD.findall(text.lower().replace("-", " "))
    out: list[str] = []
    for token in reversed(tokens):
        if token.isdigit():
            out.append(token)
        elif token in NUMBER_WORDS:
            out.append(NUMBER_WORDS[token])
        else:
            break
    return "".join(reversed(out))


def transcript_cue(text: str, expecting: Entity | None = None,
                   after_question: bool = False) -> Cue:
    """What the words so far say about whether the caller has finished."""
    stripped = text.strip()
    words = _WORD.findall(stripped.lower())
    if not words:
        return "complete"
    digits = digits_of(stripped)
    if expecting == "phone":
        # US numbers have 10 digits (11 with the country code); 7 is a local number.
        if digits and len(digits) not in (7, 10, 11):
            return "entity"
        if not digits:
            return "entity" if stripped.endswith(("...", "-", ",")) else "complete"
    elif expecting is None and len(digits) in PHONE_GROUPS:
        return "entity"  # "call me back on 555 ..." : a number in its usual groups, unfinished
    if expecting == "zip" and len(digits) < 5:
        return "entity"
    if expecting == "number" and len(digits) < 4:
        return "entity"
    if expecting == "email" and not re.search(r"(\.|\bdot\s*)(com|org|net|edu|io|co|uk)\b",
                                              stripped.lower()):
        return "entity"
    if expecting == "spelling" and len(words[-1]) == 1 and words[-1] not in ("a", "i"):
        return "entity"
    if expecting == "birthdate" and not _YEAR.search(stripped):
        return "entity"
    if expecting == "date" and not _DAY.search(stripped):
        return "entity"
    last = words[-1]
    tail = " ".join(words[-3:])
    if (last in FILLERS or stripped.endswith(("...", "…", "-"))
            or tail.endswith(HESITATION_PHRASES)):
        return "hesitation"
    if last in CONTINUATIONS:
        return "unfinished"
    if after_question and len(words) <= 3 and words[0] in SHORT_ANSWERS:
        return "answer"
    if len(words) <= 4 and GREETINGS.intersection(words) and GREETING_WORDS.issuperset(words):
        return "greeting"
    return "complete"


# The decision ---------------------------------------------------------------------------------


@dataclass(slots=True)
class EndOfTurnPolicy:
    """Silence budgets (ms after the last voiced window) for each kind of evidence."""

    complete_ms: int = 256  # the model hears a finished turn (and the words do not object)
    words_complete_ms: int = 350  # no model: the words look finished
    answer_ms: int = 320  # no model: a short answer to the bot's yes/no question
    unsure_ms: int = 1300  # the model is unsure
    incomplete_ms: int = 1500  # the model hears an unfinished turn
    hesitation_ms: int = 2000  # trailing "uh", "and", "to", "..."
    greeting_ms: int = 900  # "Hi there." alone: the reason for the call usually follows
    entity_ms: int = 2000  # digits, an e-mail address or a date being dictated
    no_words_ms: int = 700  # no model, and the transcript is not in yet
    max_ms: int = 2000  # never wait longer than this
    short_extra_ms: int = 160  # added for a one- or two-word turn ("Yes," often goes on)
    complete_probability: float = 0.5
    incomplete_probability: float = 0.15

    def shortest_ms(self) -> int:
        """The shortest silence any decision may wait for (`budget` gives one of these, or
        more)."""
        return min(self.complete_ms, self.words_complete_ms, self.answer_ms, self.unsure_ms,
                   self.incomplete_ms, self.hesitation_ms, self.greeting_ms, self.entity_ms,
                   self.no_words_ms, self.max_ms)

    def budget(self, probability: float | None, cue: Cue | None, uses_model: bool,
               needs_words: bool, words: int = 3) -> tuple[int, str]:
        """(silence budget in ms, reason) for one pause's evidence so far.

        `needs_words`: entity mode, where only the transcript can say the value is complete.
        `words`: how many words the caller has said in this turn so far.
        """
        budget, reason = self._budget(probability, cue, uses_model, needs_words)
        if reason in ("model_complete", "words_complete", "answer") and words <= 2:
            budget = min(budget + self.short_extra_ms, self.max_ms)
        return budget, reason

    def _budget(self, probability: float | None, cue: Cue | None, uses_model: bool,
                needs_words: bool) -> tuple[int, str]:
        if cue in ("entity", "hesitation", "unfinished"):
            wait = self.entity_ms if cue == "entity" else self.hesitation_ms
            return min(wait, self.max_ms), str(cue)
        if cue == "greeting":
            return min(self.greeting_ms, self.max_ms), "greeting"
        if not uses_model:
            if cue is None:
                return (self.max_ms if needs_words else min(self.no_words_ms, self.max_ms),
                        "pending")
            if cue == "answer":
                return self.answer_ms, "answer"
            return self.words_complete_ms, "words_complete"
        if probability is None or cue is None:
            return self.max_ms, "pending"  # the model and the words must both have spoken
        if probability >= self.complete_probability:
            return self.complete_ms, "model_complete"
        if probability < self.incomplete_probability:
            return min(self.incomplete_ms, self.max_ms), "model_incomplete"
        return min(self.unsure_ms, self.max_ms), "model_unsure"


@dataclass(slots=True)
class TurnDecision:
    """Why a turn ended: shown per turn in the call's events."""

    reason: str
    budget_ms: int
    probability: float | None = None
    cue: Cue | None = None
    transcript: str | None = None


@dataclass(slots=True)
class TurnDetector:
    """One call's end-of-turn state: the evidence for the current pause and its budget.

    Usage, per pause: `pause(last_voice_at)`, then `add_probability` / `add_transcript` as
    the model and the speculative STT finish, and `due(silence_ms)` on every frame; `resume()` when the
    caller goes on. `uses_model` says whether a probability will come (else only the words).
    """

    policy: EndOfTurnPolicy = field(default_factory=EndOfTurnPolicy)
    uses_model: bool = True
    expecting: Entity | None = None
    after_question: bool = False
    words_required: bool = False  # a sound over the bot: only its words can end it
    last_voice_at: float | None = None
    probability: float | None = None
    transcript: str | None = None

    def expect_after(self, bot_text: str | None) -> None:
        """The bot just said `bot_text`: set entity mode / question mode for the next turn."""
        self.expecting = expected_entity(bot_text)
        self.after_question = asked_question(bot_text)

    def pause(self, last_voice_at: float) -> None:
        self.last_voice_at = last_voice_at
        self.probability = None
        self.transcript = None

    def resume(self) -> None:
        self.last_voice_at = None
        self.probability = None
        self.transcript = None

    def add_probability(self, probability: float) -> None:
        if self.last_voice_at is not None:
            self.probability = probability

    def add_transcript(self, text: str) -> None:
        if self.last_voice_at is not None:
            self.transcript = text

    @property
    def cue(self) -> Cue | None:
        if self.transcript is None:
            return None
        return transcript_cue(self.transcript, self.expecting, self.after_question)

    def decision(self) -> TurnDecision:
        """The budget for the evidence in so far (the outer bound while it is missing)."""
        cue = self.cue
        if cue == "answer" and self.uses_model:
            cue = "complete"  # the model still hears whether "yes, ..." goes on
        needs_words = self.expecting is not None or self.words_required
        words = len(_WORD.findall((self.transcript or "").lower()))
        budget, reason = self.policy.budget(self.probability, cue, self.uses_model, needs_words,
                                            words)
        return TurnDecision(reason, budget, self.probability, cue, self.transcript)

    def due(self, silence_ms: float) -> bool:
        """True when the silence since the last voiced window (audio time, as the listener
        counts it) has used up the budget."""
        if self.last_voice_at is None:
            return False
        return silence_ms + 1e-6 >= self.decision().budget_ms
