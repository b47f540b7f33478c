"""The compiled pieces: telephony/_fastmedia.c (Twilio's media messages, the WebSocket frames
that carry them and the caller's quiet frames held, in C) and media/_silero.c (Silero VAD's
forward pass).

Everything else about the package is in pyproject.toml. Both extensions are optional: without
a C compiler the install goes on, `telephony.messages` reads media in Python instead, every
frame goes through the stream in Python (no quiet hold), and Silero runs in ONNX Runtime.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("telephony._fastmedia", ["telephony/_fastmedia.c"], optional=True,
              extra_compile_args=["-O2"]),
    # -O2 keeps the kernel's register blocking as written; x86-64 builds carry an AVX2/FMA
    # clone chosen at load time (media/_silero.c).
    Extension("media._silero", ["media/_silero.c"], optional=True,
              extra_compile_args=["-O2"]),
])
