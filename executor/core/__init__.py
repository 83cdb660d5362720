"""The pure core: decisions and formats, stdlib only, no I/O.

Nothing here opens a file, a socket or a process; the adapters do that and hand plain values in.
Everything in this package is unit-tested without a daemon (import-linter holds the rule).
"""
