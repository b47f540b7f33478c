"""The one compiled piece: telephony/_fastmedia.c (Twilio's media messages read in C).

Everything else about the package is in pyproject.toml. The extension is optional: without a
C compiler the install goes on, and `telephony.messages` reads media in Python instead.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("telephony._fastmedia", ["telephony/_fastmedia.c"], optional=True,
                             extra_compile_args=["-O2"])])
