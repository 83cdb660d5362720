"""`libvirt-executor docker-cache prune`: drop the Docker layer cache's lineages of this
executor (or of one project). Disks that running jobs read stay until those jobs end."""

from __future__ import annotations

from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.layercache import size_text
from executor.core.settings import Settings
from executor.jobvm import layercache


def prune(settings: Settings, project_id: int | None = None) -> list[str]:
    """What was done, one line each."""
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        state = StateDir(settings.paths.state_dir)
        before = {v.name: v.bytes for v in layercache.inventory(hv, settings, state).lineages}
        dropped = layercache.prune(hv, settings, state, project_id)
    which = f"of project {project_id}" if project_id is not None else f"of prefix {settings.vm.name_prefix!r}"
    if not dropped:
        return [f"no lineages {which}"]
    return [f"dropped {name} ({size_text(before.get(name, 0))})" for name in dropped]
