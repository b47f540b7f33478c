"""Per-turn latency bookkeeping: when each stage of a reply started and finished."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.events import TurnMetrics


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000, 1)


@dataclass(slots=True)
class TurnTiming:
    """Monotonic timestamps of one turn, from the end of the caller's speech to the reply.

    `metrics()` turns them into `TurnMetrics`: V2V is end of speech → first audio sent, and
    own overhead is what V2V leaves after the endpointing wait, the wait for the transcript,
    the LLM's first sentence and the first TTS chunk.
    """

    last_voice_at: float
    ended_at: float
    stt_ms: float | None = None
    transcript_at: float | None = None
    llm_start: float | None = None
    first_token_at: float | None = None
    first_sentence_at: float | None = None
    tts_first_ms: float | None = None
    # False for a reply that answers no measured turn end (a resumed call answering the words
    # its dropped stream left unanswered): its latency parts are not published.
    measured: bool = True

    def metrics(self, call_sid: str, turn: int, first_audio_at: float | None) -> TurnMetrics:
        endpoint = _ms(self.last_voice_at, self.ended_at)
        stt_wait = _ms(self.ended_at, self.transcript_at)
        first_sentence = _ms(self.llm_start, self.first_sentence_at)
        v2v = _ms(self.last_voice_at, first_audio_at)
        parts = [endpoint, stt_wait, first_sentence, self.tts_first_ms]
        overhead = (
            round(v2v - sum(p for p in parts if p is not None), 1) if v2v is not None else None
        )
        return TurnMetrics(
            call_sid=call_sid,
            turn=turn,
            endpoint_ms=endpoint,
            stt_ms=None if self.stt_ms is None else round(self.stt_ms, 1),
            stt_wait_ms=stt_wait,
            llm_first_token_ms=_ms(self.llm_start, self.first_token_at),
            llm_first_sentence_ms=first_sentence,
            tts_first_chunk_ms=None if self.tts_first_ms is None else round(self.tts_first_ms, 1),
            v2v_ms=v2v,
            overhead_ms=overhead,
        )
