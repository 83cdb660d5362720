"""`executor.admin.listing.list_vms` and its two renderings, against libvirt's test driver."""

from __future__ import annotations

import json
import time

import pytest

from executor import cli
from executor.admin.listing import format_json, format_table, list_vms
from tests.unit.admin.test_reap import Host

NOW = int(time.time())


@pytest.fixture
def host(hv, tmp_settings):
    return Host(hv, tmp_settings)


def test_list_shows_only_our_vms_and_orphans(host):
    host.job("lvx-job-1", expires=NOW + 1800, created=NOW - 300)
    host.pieces("lvx-job-2")
    host.pieces("lvx-job-3")
    host.domain("lvx-job-3", expires=NOW, metadata=False)
    (host.state.leases / "192.168.213.77").write_text("")
    with host.state.job_lock("lvx-job-2", 0):
        listing = list_vms(host.settings, now=NOW)
    assert [vm["name"] for vm in listing["vms"]] == ["lvx-job-1"]  # not "test", not lvx-job-3
    vm = listing["vms"][0]
    assert vm == {
        "name": "lvx-job-1",
        "job_id": 1,
        "source": "cold",
        "pool_state": None,
        "project_id": 17,
        "project": "group/project",
        "pipeline_id": 900,
        "runner_id": 3,
        "state": "running",
        "ip": "192.168.122.10",
        "accel": "tcg",
        "created": NOW - 300,
        "expires": NOW + 1800,
        "age_s": 300,
        "expires_in_s": 1800,
        "expired": False,
        "busy": False,
        "removing": False,
    }
    assert listing["orphans"] == [
        {
            "vm": "lvx-job-2",
            "volumes": ["lvx-job-2-seed.iso", "lvx-job-2.qcow2"],
            "ip_reservations": ["192.168.213.11"],
            "lock_file": True,
            "job_dir": True,
            "console_log": True,
            "claims": [],
            "busy": True,
        },
    ]
    assert listing["unowned_ip_reservations"] == ["192.168.213.77"]
    assert json.loads(format_json(listing)) == listing

    table = format_table(listing).splitlines()
    assert table[0].split() == ["NAME", "JOB", "PROJECT", "STATE", "IP", "AGE", "EXPIRES", "ACCEL"]
    assert table[1].split() == [
        "lvx-job-1",
        "1",
        "group/project",
        "running",
        "192.168.122.10",
        "5m00s",
        "in",
        "30m00s",
        "tcg",
    ]
    assert any(line.strip().startswith("lvx-job-2 (busy): volume lvx-job-2-seed.iso") for line in table)
    assert table[-1] == "IP reservations without an owner: 192.168.213.77"


def test_list_when_empty(host):
    listing = list_vms(host.settings, now=NOW)
    assert listing["vms"] == [] and listing["orphans"] == []
    assert format_table(listing) == "no VMs of this executor (prefix 'lvx')"


def test_table_marks_expired_and_strips_control_characters(host):
    listing = {
        "prefix": "lvx",
        "vms": [
            {
                "name": "lvx-job-9",
                "job_id": 9,
                "pool_state": None,
                "project_id": None,
                "project": "evil\x1b[31m",
                "state": "running",
                "ip": "192.168.213.10",
                "accel": "kvm",
                "age_s": 4000,
                "expires_in_s": -65,
                "busy": True,
            }
        ],
        "orphans": [],
        "unowned_ip_reservations": [],
        "now": 0,
        "docker_cache": {"enabled": False, "lineages": []},
    }
    row = format_table(listing).splitlines()[1]
    assert "\x1b" not in row
    assert "1m05s ago (due)" in row and "running (busy)" in row


def test_cli_list_json_and_reap_exit_codes(host, tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(
        f'[libvirt]\nuri = "test:///default"\npool = "default-pool"\nnetwork = "default"\n'
        f'[paths]\nstate_dir = "{host.settings.paths.state_dir}"\nconsole_log_dir = "{host.settings.paths.console_log_dir}"\n'
    )
    host.pieces("lvx-job-4")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", str(config), "list", "--json"])
    assert exit_info.value.code == 0
    assert [o["vm"] for o in json.loads(capsys.readouterr().out)["orphans"]] == ["lvx-job-4"]

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", str(config), "reap", "--dry-run"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("reap: would remove lvx-job-4 (orphaned")
    assert len(host.leftovers("lvx-job-4")) == 6

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", str(config), "reap", "--older-than", "soon"])
    assert exit_info.value.code == 2
    assert "--older-than" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", str(config), "reap"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("reap: removed lvx-job-4 (orphaned")
    assert host.leftovers("lvx-job-4") == []
    with pytest.raises(SystemExit):
        cli.main(["--config", str(config), "reap"])
    assert capsys.readouterr().out == "reap: nothing to do\n"


def test_table_ends_with_the_docker_cache_lineages():
    listing = {
        "prefix": "lvx",
        "vms": [],
        "orphans": [],
        "unowned_ip_reservations": [],
        "now": 1000,
        "docker_cache": {
            "enabled": True,
            "total_bytes": 3 * 1024**3,
            "max_total_bytes": 100 * 1024**3,
            "disks_in_use": 1,
            "lineages": [
                {
                    "name": "lvx-p7-protected",
                    "project_id": 7,
                    "protected": True,
                    "bytes": 40 * 1024**2,
                    "overlays": 2,
                    "writes": 5,
                    "used": 900,
                },
            ],
        },
    }
    lines = format_table(listing).splitlines()
    assert "Docker layer cache: 1 lineages, 3.00 of 100 GiB, 1 job disks in use" in lines
    assert lines[-1].split() == ["lvx-p7-protected", "7", "protected", "40.0", "MiB", "2", "5", "1m40s", "ago"]
    listing["docker_cache"] = {"enabled": False, "lineages": []}
    assert "Docker layer cache" not in format_table(listing)
