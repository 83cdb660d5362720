"""What the benchmarks that go through the executor share (prepare, mirror, dind, liveness): a
config derived from the host's, and one prepared job that is always cleaned up."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from executor.adapters.hostfiles import load_settings
from executor.core.nwfilter_xml import FILTER_NAME
from executor.core.settings import MirrorSettings, settings_toml
from executor.testing.runnersim import RunnerSim, StageResult


def bench_config(
    host_config: str,
    path: Path,
    prefix: str,
    registry: str = "",
    docker: Mapping[str, Any] | None = None,
    mirror: MirrorSettings | None = None,
    **sections: Any,
) -> Path:
    """The host config at `path` with the VM name prefix `prefix`, a console dir beside `path`,
    the executor's network policy, and the bench registry `registry` (host:port on the VM
    network, if any) open to VMs and allowed over plain HTTP; plus these [docker] keys, [mirror]
    section and other whole sections (the host's otherwise)."""
    host = load_settings(host_config)
    network, insecure = host.network, host.docker.insecure_registries
    if registry:
        network = dataclasses.replace(host.network, allow_host_ports=(int(registry.rsplit(":", 1)[1]),))
        insecure = (registry,)
    settings = dataclasses.replace(
        host,
        libvirt=dataclasses.replace(host.libvirt, nwfilter=FILTER_NAME),
        vm=dataclasses.replace(host.vm, name_prefix=prefix),
        paths=dataclasses.replace(host.paths, console_log_dir=str(path.parent / "console")),
        network=network,
        docker=dataclasses.replace(host.docker, insecure_registries=insecure, **(docker or {})),
        mirror=mirror or host.mirror,
        **sections,
    )
    path.write_text(settings_toml(settings))
    return path


@contextmanager
def prepared_job(
    config: Path,
    workdir: Path,
    job_id: int,
    payload: dict[str, object] | None = None,
    variables: dict[str, str] | None = None,
) -> Iterator[tuple[RunnerSim, StageResult]]:
    """A job through prepare (SystemExit with its output if prepare fails), cleaned up afterwards
    whatever happens."""
    sim = RunnerSim(config, workdir / f"job{job_id}", job_id, payload_extra=payload, variables=variables)
    try:
        prepared = sim.prepare()
        if prepared.rc != 0:
            raise SystemExit(f"prepare failed:\n{prepared.describe()}")
        yield sim, prepared
    finally:
        sim.cleanup()
