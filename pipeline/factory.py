"""The one place where engines are chosen from settings and loaded."""

from __future__ import annotations

import logging
import time

from media.vad import EnergyVad, SileroSession, SileroVad, Vad
from pipeline.engines import LanguageModel, SpeechToText, TextToSpeech
from voicebot.settings import Settings

log = logging.getLogger(__name__)


def build_stt(settings: Settings) -> SpeechToText:
    if settings.stt_provider == "openai":
        from pipeline.stt_openai import OpenAiStt

        return OpenAiStt.from_settings(settings)
    from pipeline.stt import WhisperStt

    return WhisperStt(settings.stt_model, threads=settings.stt_threads)


def build_llm(settings: Settings) -> LanguageModel:
    provider = settings.resolved_llm_provider
    if provider == "local":
        from pipeline.llm_local import LlamaCppLlm

        return LlamaCppLlm.from_settings(settings)
    from pipeline.call_control import CALL_TOOLS
    from pipeline.llm_openai import OpenAiLlm

    llm = OpenAiLlm.from_settings(settings)
    if settings.llm_tools != "off":
        llm.tools = CALL_TOOLS  # OpenAI-style function calling: end_call, transfer_call
    return llm


def build_tts(settings: Settings) -> TextToSpeech:
    if settings.tts_engine == "piper":
        from pipeline.tts_piper import PiperTts

        return PiperTts(settings.tts_voice)
    from pipeline.tts_network import GttsTts, OpenAiTts

    if settings.tts_engine == "gtts":
        return GttsTts.from_settings(settings)
    return OpenAiTts.from_settings(settings)


def build_vad_factory(settings: Settings, kind: str = "silero"):
    """A factory of per-call VADs sharing one loaded model, at `settings.vad_rate`. At 16 kHz
    it also reads soxr's block schedule for the listeners' 8 -> 16 kHz streams now (13 ms,
    once), not in a call's first frame."""
    from media.resample import StreamResampler

    if kind == "energy":
        rate = settings.vad_rate

        def make() -> Vad:
            return EnergyVad(sample_rate=rate)
    else:
        session = SileroSession(rate=settings.vad_rate, native=settings.vad_kernel == "native")
        # Its rate: the one asked for, or 16 kHz if the 8 kHz model was unavailable (logged).
        rate = session.rate
        log.info("Silero VAD at %d Hz (%s)", rate, "compiled forward pass"
                 if session.kind == "native" else f"{session.kind} graph")

        def make() -> Vad:
            return SileroVad(session, gate_dbfs=settings.energy_gate_dbfs)
    if rate != 8000:
        StreamResampler.prepare(8000, 16000)
    return make


def timed(label: str):
    """Log how long loading something took."""

    class _Timer:
        def __enter__(self) -> None:
            self.start = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            log.info("loaded %s in %.2f s", label, time.perf_counter() - self.start)

    return _Timer()
