"""jobvm.runnervolume: which binary, its hash (remembered until it is replaced), one volume per hash.

libvirt's test driver cannot upload into a volume, so making a volume for real is in the vm
tests (tests/vm/test_artifacts_cache.py); here: reuse, and a failed make that leaves nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from executor.adapters.statedir import StateDir
from executor.core import runnerbinary
from executor.core.domain_xml import build_raw_volume
from executor.core.settings import RunnerSettings
from executor.errors import ConfigError, SystemFailure
from executor.jobvm import runnervolume

POOL = "default-pool"


def _binary(path, text: str):
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_the_configured_binary_wins_and_an_unusable_one_is_a_config_error(tmp_settings, tmp_path, monkeypatch):
    on_path = _binary(tmp_path / "gitlab-runner", "#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert runnervolume.find_binary(tmp_settings) == on_path
    configured = _binary(tmp_path / "runner-17", "#!/bin/sh\n")
    settings = dataclasses.replace(tmp_settings, runner=RunnerSettings(binary=str(configured)))
    assert runnervolume.find_binary(settings) == configured
    configured.chmod(0o644)
    with pytest.raises(ConfigError, match="is not an executable file"):
        runnervolume.find_binary(settings)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert runnervolume.find_binary(tmp_settings) is None


def test_the_hash_is_remembered_until_the_binary_is_replaced(tmp_settings, tmp_path, monkeypatch):
    binary = _binary(tmp_path / "gitlab-runner", "version 1\n")
    settings = dataclasses.replace(tmp_settings, runner=RunnerSettings(binary=str(binary)))
    state = StateDir(settings.paths.state_dir)
    first = runnervolume.host_binary(settings, state)
    assert first is not None and first.sha256 == hashlib.sha256(b"version 1\n").hexdigest()
    reads = []
    real_open = type(binary).open

    def counting_open(self, *args, **kwargs):
        if self == binary:
            reads.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(type(binary), "open", counting_open)
    assert runnervolume.host_binary(settings, state) == first and reads == []  # from the memo
    replacement = _binary(tmp_path / "new", "version 2\n")
    replacement.replace(binary)
    second = runnervolume.host_binary(settings, state)
    assert second is not None and second.sha256 == hashlib.sha256(b"version 2\n").hexdigest() and reads == [binary]


def test_a_recorded_volume_is_reused_and_a_half_made_one_is_replaced(hv, tmp_settings, tmp_path):
    binary = _binary(tmp_path / "gitlab-runner", "runner\n")
    settings = dataclasses.replace(tmp_settings, runner=RunnerSettings(binary=str(binary)))
    state = StateDir(settings.paths.state_dir)
    found = runnervolume.host_binary(settings, state)
    assert found is not None
    name = runnerbinary.volume_name(settings.vm.name_prefix, found.sha256)
    path = hv.create_volume(POOL, build_raw_volume(name, 4096))
    # No record: its maker died before finishing. Making it again needs an upload, which the
    # test driver refuses: the failure leaves no volume behind.
    with pytest.raises(SystemFailure, match=f"uploading volume {name}"):
        runnervolume.ensure_volume(hv, settings, state, found)
    assert name not in hv.volume_names(POOL)
    # Recorded (a finished make): reused as it is.
    path = hv.create_volume(POOL, build_raw_volume(name, 4096))
    state.write_runner_record(name, {"sha256": found.sha256, "superseded": None})
    assert runnervolume.ensure_volume(hv, settings, state, found) == path
