"""executor.stages.config: the JSON config_exec prints."""

from __future__ import annotations

import json

from executor import __version__
from executor.core.jobenv import Job
from executor.core.settings import Settings, VMSettings
from executor.stages.config import config_json


def job(job_id=4242) -> Job:
    return Job(job_id=job_id, project_id=1, project="g/p", pipeline_id=2, runner_id=3, timeout_s=3600)


# --- config_json -------------------------------------------------------------------------------


def test_config_json_is_what_gitlab_runner_expects():
    settings = Settings(vm=VMSettings(name_prefix="ci", builds_dir="/b", cache_dir="/c"))
    data = config_json(settings, job(77))
    assert data == {
        "builds_dir": "/b",
        "cache_dir": "/c",
        "builds_dir_is_shared": False,
        "hostname": "ci-job-77",
        "driver": {"name": "libvirt-executor", "version": __version__},
    }
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
