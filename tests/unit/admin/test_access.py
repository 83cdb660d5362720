"""`env` and `ssh` for an operator: they refuse a job whose VM is gone or not ours, on libvirt's
test driver (the way into a real VM is in tests/vm/test_dind.py)."""

from __future__ import annotations

import pytest

from executor import cli
from executor.admin import access
from executor.core.domain_xml import build_domain
from executor.errors import SystemFailure
from tests.unit.conftest import make_driver_spec, make_record


def test_env_says_the_job_is_gone(hv, tmp_settings):
    with pytest.raises(SystemFailure, match="job 4040: the job's VM lvx-job-4040 does not exist"):
        access.docker_env(tmp_settings, 4040)


def test_ssh_refuses_a_domain_without_our_metadata(hv, tmp_settings):
    spec = make_driver_spec(make_record(vm="lvx-job-4041"), name="lvx-job-4041")
    hv.define_and_start(build_domain(spec).replace("libvirt-executor", "someone-else"))
    with pytest.raises(SystemFailure, match="job 4041: domain lvx-job-4041 carries no libvirt-executor metadata"):
        access.ssh_session(tmp_settings, 4041, "true", 0, None, None)


def test_env_prints_the_docker_cli_lines_for_a_running_job(hv, tmp_settings):
    from executor.adapters.statedir import StateDir

    spec = make_driver_spec(make_record(vm="lvx-job-4042", job_id=4042, ip="192.168.213.42"), name="lvx-job-4042")
    hv.define_and_start(build_domain(spec))
    state = StateDir(tmp_settings.paths.state_dir)
    state.write_docker_client("lvx-job-4042", "CA", "CERT", "KEY")
    lines = access.docker_env(tmp_settings, 4042)
    cert_dir = state.job_dir("lvx-job-4042") / "docker"
    assert lines[:3] == [
        "export DOCKER_HOST=tcp://192.168.213.42:2376",
        "export DOCKER_TLS_VERIFY=1",
        f"export DOCKER_CERT_PATH={cert_dir}",
    ]
    assert sorted(p.name for p in cert_dir.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]


def test_cli_refuses_a_job_id_that_is_not_a_positive_integer(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["env", "0"])
    assert info.value.code == 2 and "0 is not in the range x>=1" in capsys.readouterr().err
