"""Build the native vCPU step runner; everything else is in pyproject.toml.

The extension is optional: where it cannot be compiled (no compiler, no Python headers)
the install goes on without it and devstate uses its ctypes path (README, "Native engine").
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "devstate.devices.kvm._steps",
    sources=["devstate/devices/kvm/_steps.c"],
    extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
    optional=True,
)])
