"""Adapters: one third-party library or host resource each, never each other.

Each module is the only place that talks to its library or resource (libvirt, paramiko,
cryptography, pycdlib, the state directory, host files, host tools) and turns its errors into
the executor's own (`executor.errors`). Orchestration lives in `stages` and `admin`.
"""
