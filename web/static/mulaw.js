"use strict";
/* G.711 μ-law, the codec of Twilio Media Streams (8 kHz, one byte per sample). */
(function () {
  const BIAS = 0x84;
  const SEGMENT_ENDS = [0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff, 0x1fff];

  /* The 14-bit G.711 encoder as in CPython's audioop (st_14linear2ulaw), like media/mulaw.py,
     so the browser's bytes equal what a phone call's would be. */
  function encodeSample(sample) {
    let pcm = sample >> 2;
    let mask = 0xff;
    if (pcm < 0) {
      pcm = -pcm;
      mask = 0x7f;
    }
    pcm = Math.min(pcm, 8159) + (BIAS >> 2);
    let segment = 0;
    while (segment < 8 && pcm > SEGMENT_ENDS[segment]) segment += 1;
    if (segment >= 8) return (0x7f ^ mask) & 0xff;
    return (((segment << 4) | ((pcm >> (segment + 1)) & 0x0f)) ^ mask) & 0xff;
  }

  const DECODE = new Int16Array(256);
  for (let i = 0; i < 256; i += 1) {
    const u = ~i & 0xff;
    const exponent = (u >> 4) & 0x07;
    const magnitude = ((((u & 0x0f) << 3) + BIAS) << exponent) - BIAS;
    DECODE[i] = u & 0x80 ? -magnitude : magnitude;
  }

  /** Int16 samples (or floats in [-1, 1]) → μ-law bytes. */
  function encode(samples) {
    const out = new Uint8Array(samples.length);
    const floats = samples instanceof Float32Array;
    for (let i = 0; i < samples.length; i += 1) {
      const value = floats ? Math.round(Math.max(-1, Math.min(1, samples[i])) * 32767) : samples[i];
      out[i] = encodeSample(value);
    }
    return out;
  }

  /** μ-law bytes → Int16 samples. */
  function decodeInt16(bytes) {
    const out = new Int16Array(bytes.length);
    for (let i = 0; i < bytes.length; i += 1) out[i] = DECODE[bytes[i]];
    return out;
  }

  /** μ-law bytes → floats in [-1, 1] for Web Audio. */
  function decode(bytes) {
    const out = new Float32Array(bytes.length);
    for (let i = 0; i < bytes.length; i += 1) out[i] = DECODE[bytes[i]] / 32768;
    return out;
  }

  window.Mulaw = { encode, decode, decodeInt16 };
})();
