"""Wire formats only: packet headers, end-of-state markers, channel hellos, main-channel
control messages, and their codecs.

Runs in: coordinators and workers of both sides. Imports only errors: a format never knows
who sends it or how it travels.
"""
