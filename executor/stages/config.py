"""config_exec: the JSON that tells gitlab-runner where builds and caches live, and who we are."""

from __future__ import annotations

from typing import Any

from executor import __version__
from executor.core import naming
from executor.core.jobenv import Job
from executor.core.settings import Settings

DRIVER_NAME = "libvirt-executor"


def config_json(settings: Settings, job: Job) -> dict[str, Any]:
    """What `config_exec` prints: where builds and caches live inside the VM, and who we are."""
    return {
        "builds_dir": settings.vm.builds_dir,
        "cache_dir": settings.vm.cache_dir,
        "builds_dir_is_shared": False,
        "hostname": naming.vm_name(settings.vm.name_prefix, job.job_id),
        "driver": {"name": DRIVER_NAME, "version": __version__},
    }
