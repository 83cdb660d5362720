"""libvirt domain states by name, and which of them mean "QEMU still holds the VM"."""

from __future__ import annotations

# A domain in any of these is still a running QEMU process: it holds its disk and its address,
# and `destroy` is needed to end it. "shutoff" and "crashed" hold nothing.
ACTIVE_STATES = frozenset({"running", "blocked", "paused", "shutdown", "suspended", "nostate"})


def is_active(state: str) -> bool:
    return state in ACTIVE_STATES
