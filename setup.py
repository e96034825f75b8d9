"""The optional compiled hit path (greenscope/_speedups.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler, or on an interpreter other than CPython, the build goes on
without it and greenscope runs its pure-Python hit path (see greenscope/registry.py).
"""

import platform

from setuptools import Extension, setup

ext_modules = []
if platform.python_implementation() == "CPython":
    ext_modules.append(
        Extension("greenscope._speedups", ["greenscope/_speedups.c"], optional=True)
    )

setup(ext_modules=ext_modules)
