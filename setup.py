"""Build of the Cython relay engine.

Release build: -O2, no Cython bounds/wraparound checks, no asserts.
FASTSOCKS_CYTHON_DEBUG=1 builds with annotated HTML, line tracing (for
coverage and profilers) and Cython's own checks turned back on.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTSOCKS_CYTHON_DEBUG") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}
macros = [("NDEBUG", None)]
compile_args = ["-O2"]
if DEBUG:
    directives.update(linetrace=True, profile=True)
    macros = [("CYTHON_TRACE_NOGIL", "1")]
    compile_args = ["-O0", "-g"]

extensions = [
    Extension(
        "fastsocks._relay",
        ["fastsocks/_relay.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
    Extension(
        "fastsocks.bench._loadgen",
        ["fastsocks/bench/_loadgen.pyx"],
        define_macros=macros,
        extra_compile_args=compile_args,
    ),
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=DEBUG))
