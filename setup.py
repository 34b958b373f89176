"""Build script for the optional C extension; the metadata lives in pyproject.toml.

``optional=True``: where the compiler or the Python headers are missing the build
goes on without it and shmcache runs its pure-Python paths (see shmcache/_accel.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmcache._speedups",
            sources=["shmcache/_speedups.c", "shmcache/_speedups_codec.c"],
            depends=["shmcache/_speedups_codec.h"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11"],
        )
    ]
)
