"""gitlab-runner's own binary inside the job VM: names and the guest commands around it.

The runner's stage scripts call `gitlab-runner artifacts-uploader`, `cache-extractor` and the
like inside the job's environment (guarded by `if gitlab-runner --version`), and these helpers
must be the runner's own version. The host's binary goes into a small read-only ISO volume, made
once per binary hash and shared by every VM (`<prefix>-runner-<hash>.iso`); the VM sees it as a
virtio disk with a fixed serial, and prepare mounts it and links it onto the job user's PATH.
Replacing the host's binary makes the next job get the new one; the base image never changes.
Pure module: no I/O.
"""

from __future__ import annotations

import re
import shlex

BINARY_NAME = "gitlab-runner"
DISK_SERIAL = "lvx-runner"  # /sys/block/vdX/serial in the guest
MOUNT_POINT = "/opt/lvx-runner"
LINK = f"/usr/local/bin/{BINARY_NAME}"  # on the job user's PATH and on sudo's secure_path
ISO_LABEL = "LVXRUNNER"
HASH_CHARS = 16  # of the binary's sha256 in the volume name


def volume_name(prefix: str, sha256: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"{prefix}-runner-{sha256[:HASH_CHARS]}.iso"


def is_volume_name(prefix: str, name: str) -> bool:
    """Whether `name` is one of our runner volumes (any binary hash)."""
    return re.fullmatch(re.escape(prefix) + rf"-runner-[0-9a-f]{{{HASH_CHARS}}}\.iso", name) is not None


def mount_command() -> str:
    """The job user's shell command that mounts the runner disk read-only and links the binary
    onto PATH (the job user has passwordless sudo in its own VM)."""
    mount, link = shlex.quote(MOUNT_POINT), shlex.quote(LINK)
    return (
        "dev=; for d in /sys/block/vd*; do "
        f'[ "$(cat "$d/serial" 2>/dev/null)" = {DISK_SERIAL} ] && dev=/dev/${{d##*/}}; done; '
        f'[ -n "$dev" ] || {{ echo "no disk with serial {DISK_SERIAL}" >&2; exit 3; }}; '
        f"sudo -n install -d -m 0755 {mount} && "
        f'sudo -n mount -t iso9660 -o ro,nodev,nosuid "$dev" {mount} && '
        f"sudo -n ln -sfn {shlex.quote(MOUNT_POINT + '/' + BINARY_NAME)} {link} && "
        f"{link} --version >/dev/null"
    )
