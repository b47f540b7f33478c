"""The one compiled piece: telephony/_fastmedia.c (Twilio's media messages, the WebSocket
frames that carry them and the caller's quiet frames held, in C).

Everything else about the package is in pyproject.toml. The extension is optional: without a
C compiler the install goes on, `telephony.messages` reads media in Python instead, and every
frame goes through the stream in Python (no quiet hold).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("telephony._fastmedia", ["telephony/_fastmedia.c"], optional=True,
                             extra_compile_args=["-O2"])])
