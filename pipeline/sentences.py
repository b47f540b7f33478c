"""Turning a stream of LLM text deltas into speakable sentences, as soon as each one ends.

TTS starts on the first sentence while the LLM is still writing the rest, so the splitter must
cut early but never in the middle of "3.5", "Dr. Smith", "e.g. this" or "10:30". A period is
only decided once the next character is seen (a digit after it means a decimal), so the output
does not depend on how the text was chunked. Markdown and emoji, which a TTS engine would read
aloud or choke on, are stripped from each sentence.
"""

from __future__ import annotations

import re

# Titles and Latin abbreviations that are (almost) never the end of a sentence.
_NEVER_ENDS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "mt", "vs", "cf", "e.g", "i.e", "approx", "dept", "fig"}
)
# Abbreviations (and short words) that may end a sentence: a break only if the next word is
# capitalised, so "at 9 a.m. Then" breaks and "at 9 a.m. tomorrow" or "No. 5" does not.
_MAYBE_ENDS = frozenset(
    {"etc", "a.m", "p.m", "inc", "ltd", "co", "jr", "sr", "no", "vol"}
    | {"jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
)

_TERMINATORS = ".!?"
_SOFT_TERMINATORS = ";:,"
# Characters that belong to the sentence they follow: closing quotes, brackets, emphasis.
_CLOSERS = "\"')]}*_”’»`"
_OPENERS = "\"'([{*_“‘«`"

_EMOJI = re.compile(
    "["
    "\U0001f000-\U0001faff"  # emoticons, pictographs, transport, flags, symbols & pictographs
    "\u2600-\u27bf"  # miscellaneous symbols, dingbats
    "\u2b00-\u2bff"  # arrows and stars (⭐)
    "\u2300-\u23ff"  # technical symbols (⌚ ⏰)
    "\ufe0f\u200d\u20e3"  # variation selector, zero-width joiner, keycap
    "]+"
)
_CODE_FENCE = re.compile(r"```[^\n`]*")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_LINE_MARKER = re.compile(r"^\s*(?:#{1,6}\s*|>\s*|[-*+•]\s+|\d{1,3}[.)]\s+)+")
_EMPHASIS = re.compile(r"\*+|(?<!\w)_+|_+(?!\w)|`+|~~")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])")


def speakable(text: str) -> str:
    """Strip what a TTS engine should not read: markdown marks, list bullets, emoji, URLs'
    link syntax. Returns "" when nothing worth saying is left."""
    text = _CODE_FENCE.sub(" ", text)
    text = _LINK.sub(r"\1", text)
    text = _LINE_MARKER.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _EMOJI.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return text if any(ch.isalnum() for ch in text) else ""


class SentenceSplitter:
    """Feeds on LLM text deltas and hands back complete, cleaned sentences as they end.

    A sentence ends at `.`, `!` or `?` followed by whitespace (after any closing quotes or
    brackets), at a line break, and at `;`, `:` or `,` once the pending text is longer than
    `soft_chars` (a long clause is worth speaking before the sentence is done). Text that runs
    past `max_chars` without any break is cut at its last space. `flush()` returns the rest at
    the end of the reply.
    """

    def __init__(self, soft_chars: int = 60, max_chars: int = 220) -> None:
        self.soft_chars = soft_chars
        self.max_chars = max_chars
        self._buf = ""

    def feed(self, delta: str) -> list[str]:
        """Add a text delta; return the sentences it completed (possibly none)."""
        self._buf += delta
        sentences: list[str] = []
        while (cut := self._find_cut()) is not None:
            sentence = speakable(self._buf[:cut])
            self._buf = self._buf[cut:].lstrip()
            if sentence:
                sentences.append(sentence)
        return sentences

    def flush(self) -> str:
        """Return whatever is pending as the last sentence ("" if nothing speakable)."""
        rest, self._buf = self._buf, ""
        return speakable(rest)

    @property
    def pending(self) -> str:
        return self._buf

    def _find_cut(self) -> int | None:
        buf = self._buf.lstrip()
        if len(buf) != len(self._buf):
            self._buf = buf
        n = len(buf)
        i = 0
        while i < n and i < self.max_chars:
            ch = buf[i]
            if ch == "\n":
                return i + 1
            soft = ch in _SOFT_TERMINATORS and i > self.soft_chars
            if ch not in _TERMINATORS and not soft:
                i += 1
                continue
            end = i + 1
            while end < n and buf[end] in _TERMINATORS:
                end += 1
            while end < n and buf[end] in _CLOSERS:
                end += 1
            if end == n:
                return None  # the next character decides (a digit would make "3." a decimal)
            if not buf[end].isspace():
                i = end  # "3.5", "10:30", "3,500", "e.g.x"
                continue
            if ch == ".":
                verdict = self._period_ends_sentence(buf, i, end)
                if verdict is None:
                    return None
                if not verdict:
                    i = end
                    continue
            return end
        if n > self.max_chars:
            space = buf.rfind(" ", 0, self.max_chars)
            return space + 1 if space > 0 else self.max_chars
        return None

    @staticmethod
    def _period_ends_sentence(buf: str, dot: int, end: int) -> bool | None:
        """Whether the period at `dot` (followed by whitespace at `end`) ends a sentence;
        None when the next word, not yet received, decides."""
        start = max(buf.rfind(" ", 0, dot), buf.rfind("\n", 0, dot)) + 1
        word = buf[start:dot].lstrip(_OPENERS)
        if not word:
            return True
        if word.isdigit() and not buf[:start].strip():
            return False  # "1. " opening a numbered list item
        lowered = word.lower()
        if lowered in _NEVER_ENDS:
            return False
        if len(word) == 1 and word.isupper():
            return False  # an initial, as in "J. R. R. Tolkien"
        if lowered in _MAYBE_ENDS or ("." in word and word.replace(".", "").isalpha()):
            rest = buf[end:].lstrip().lstrip(_OPENERS)
            if not rest:
                return None
            return rest[0].isupper()
        return True
