"""core.runnerbinary: the runner volume's names and the guest command that mounts it."""

from __future__ import annotations

import pytest

from executor.core import runnerbinary

SHA = "ab" * 32


def test_volume_names_carry_the_prefix_and_the_binary_hash():
    name = runnerbinary.volume_name("lvx", SHA)
    assert name == "lvx-runner-abababababababab.iso"
    assert runnerbinary.is_volume_name("lvx", name)
    assert not runnerbinary.is_volume_name("other", name)
    assert not runnerbinary.is_volume_name("lvx", "lvx-job-1-seed.iso")
    with pytest.raises(ValueError, match="sha256"):
        runnerbinary.volume_name("lvx", "../etc")


def test_the_mount_command_finds_the_disk_by_serial_and_links_the_binary_onto_path():
    command = runnerbinary.mount_command()
    assert "/sys/block/vd*" in command and runnerbinary.DISK_SERIAL in command
    assert "mount -t iso9660 -o ro,nodev,nosuid" in command
    assert f"ln -sfn /opt/lvx-runner/gitlab-runner {runnerbinary.LINK}" in command
    assert command.endswith(f"{runnerbinary.LINK} --version >/dev/null")
