"""executor.core.jobsize: the VM size a job asks for, within the operator's maxima."""

from __future__ import annotations

import json

import pytest

from executor.core.jobenv import parse_job
from executor.core.jobsize import JobSize, JobSizeError, job_size, maximum_size, sized
from executor.core.settings import Settings, VMSettings, parse_settings
from executor.errors import ConfigError

ROOMY = VMSettings(vcpus=2, memory_mib=2048, disk_gib=20, max_vcpus=8, max_memory_mib=16384, max_disk_gib=100)


def test_no_request_is_the_normal_size_and_so_is_an_empty_value():
    assert job_size({}, ROOMY) == JobSize(2, 2048, 20)
    assert job_size({"LVX_VCPUS": " "}, ROOMY) == JobSize(2, 2048, 20)


def test_a_job_may_ask_for_less_or_more_up_to_the_maxima():
    assert job_size({"LVX_VCPUS": "1", "LVX_MEMORY_MIB": "1024"}, ROOMY) == JobSize(1, 1024, 20)
    assert job_size({"LVX_VCPUS": "8", "LVX_MEMORY_MIB": "16384", "LVX_DISK_GIB": "100"}, ROOMY) == JobSize(
        8, 16384, 100
    )


def test_by_default_nobody_gets_more_than_the_normal_size_and_the_message_names_the_limit():
    normal = VMSettings()
    assert maximum_size(normal) == JobSize(2, 2048, 20)
    with pytest.raises(
        JobSizeError, match=r"^the job asks for LVX_VCPUS=3, more than this runner allows \(vm.max_vcpus = 2\)$"
    ):
        job_size({"LVX_VCPUS": "3"}, normal)
    with pytest.raises(JobSizeError, match=r"LVX_DISK_GIB=101, more than this runner allows \(vm.max_disk_gib = 100\)"):
        job_size({"LVX_DISK_GIB": "101"}, ROOMY)


@pytest.mark.parametrize("raw", ["two", "1.5", "-1", "0x10", "１", "99999999", "2 4"])
def test_what_is_not_a_whole_number_is_refused_and_shown_harmlessly(raw):
    with pytest.raises(JobSizeError, match="is not a whole number"):
        job_size({"LVX_MEMORY_MIB": raw}, ROOMY)
    with pytest.raises(JobSizeError) as info:
        job_size({"LVX_MEMORY_MIB": "1\x1b[2J"}, ROOMY)
    assert "\x1b" not in str(info.value)


def test_too_little_is_refused_too():
    with pytest.raises(JobSizeError, match=r"LVX_VCPUS=0, less than a job VM needs \(at least 1\)"):
        job_size({"LVX_VCPUS": "0"}, ROOMY)
    with pytest.raises(JobSizeError, match=r"LVX_MEMORY_MIB=256, less than a job VM needs \(at least 512\)"):
        job_size({"LVX_MEMORY_MIB": "256"}, ROOMY)


def test_sized_settings_carry_the_jobs_size_and_nothing_else_changes():
    settings = Settings(vm=ROOMY)
    job_settings = sized(settings, JobSize(1, 1024, 30))
    assert (job_settings.vm.vcpus, job_settings.vm.memory_mib, job_settings.vm.disk_gib) == (1, 1024, 30)
    assert job_settings.vm.max_vcpus == 8 and job_settings.limits == settings.limits


def test_the_request_comes_from_the_payloads_variables_first_occurrence():
    payload = {
        "id": 5,
        "variables": [
            {"key": "LVX_VCPUS", "value": "1", "public": True},
            {"key": "LVX_VCPUS", "value": "8", "public": True},
            {"key": "LVX_MEMORY_MIB", "value": "1024", "public": False, "masked": True},
        ],
    }
    job = parse_job(json.dumps(payload))
    assert dict(job.size_request) == {"LVX_VCPUS": "1", "LVX_MEMORY_MIB": "1024"}


def test_maxima_below_the_normal_size_are_a_config_error():
    assert parse_settings("[vm]\nmax_vcpus = 4\nmax_memory_mib = 8192\n").vm.max_memory_mib == 8192
    with pytest.raises(
        ConfigError, match=r"vm.max_memory_mib: must be 0 \(the normal size\) or between the normal size 2048"
    ):
        parse_settings("[vm]\nmax_memory_mib = 1024\n")
