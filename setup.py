"""Build the native vCPU step runner and run engine; everything else is in pyproject.toml.

The extensions are optional: where one cannot be compiled (no compiler, no Python headers,
no kernel headers) the install goes on without it and devstate uses its pure-Python path
(README, "Native engine").
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra"]

setup(ext_modules=[
    Extension("devstate.devices.kvm._steps", sources=["devstate/devices/kvm/_steps.c"],
              extra_compile_args=FLAGS, optional=True),
    # vCPU threads in KVM_RUN (run.py); pthreads, so -pthread to compile and to link.
    Extension("devstate.devices.kvm._run", sources=["devstate/devices/kvm/_run.c"],
              extra_compile_args=[*FLAGS, "-pthread"], extra_link_args=["-pthread"],
              optional=True),
])
