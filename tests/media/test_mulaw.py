import audioop  # stdlib on 3.11/3.12: the reference implementation

import numpy as np

from media.mulaw import pcm16_to_ulaw, ulaw_silence, ulaw_to_pcm16


def test_encoder_matches_audioop_for_every_sample_value() -> None:
    samples = np.arange(-32768, 32768, dtype=np.int16)
    assert pcm16_to_ulaw(samples) == audioop.lin2ulaw(samples.tobytes(), 2)


def test_decoder_matches_audioop_for_every_code() -> None:
    codes = bytes(range(256))
    assert ulaw_to_pcm16(codes).tobytes() == audioop.ulaw2lin(codes, 2)


def test_round_trip_error_is_within_the_codec_step() -> None:
    rng = np.random.default_rng(1)
    samples = rng.integers(-20000, 20000, 8000).astype(np.int16)
    back = ulaw_to_pcm16(pcm16_to_ulaw(samples)).astype(np.int32)
    # μ-law steps grow with magnitude: at most 1/16 of the value, plus the small-signal step.
    assert np.all(np.abs(back - samples) <= np.abs(samples.astype(np.int32)) // 16 + 8)


def test_silence_decodes_to_zero() -> None:
    assert len(ulaw_silence(20)) == 160
    assert not ulaw_to_pcm16(ulaw_silence(20)).any()
