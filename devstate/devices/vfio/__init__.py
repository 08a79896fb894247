"""VFIO-style devices: the uAPI v2 state machine, a simulated device model process
speaking it, and the worker-side device that drives one.

Runs in: workers (the device) and device-model processes (the model). May import config,
net (fd I/O), lifecycle and errors.
"""
