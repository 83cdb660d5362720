"""prepare_exec: give the job a ready VM (claimed from the warm pool or booted cold), then, in
image mode, its services and build container.

On any failure, and on SIGTERM, the job's VM is torn down before the error propagates (a
system failure: gitlab-runner retries prepare).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from contextlib import ExitStack

from executor.adapters.hostfiles import console_log, console_tail, load_base_image
from executor.adapters.hypervisor import Hypervisor, connect
from executor.adapters.statedir import StateDir
from executor.core import jobsize, naming, netpolicy
from executor.core.baseimage import BaseImage, config_disagreements
from executor.core.domain_xml import JobRecord, interface_with_filter
from executor.core.jobenv import Job, RegistryCredentials
from executor.core.settings import Settings
from executor.core.waiting import signals_deferred, signals_raise_interrupted, time_limit
from executor.errors import ConfigError, Interrupted, JobRefused, SystemFailure
from executor.jobvm import boot, journal, layercache, pool
from executor.jobvm.accel import choose_accel
from executor.jobvm.boot import ReadyVM, Timings
from executor.jobvm.teardown import teardown
from executor.stages import holder, imagemode
from executor.stages.cleanup import LOCK_WAIT_S
from executor.stages.config import DRIVER_NAME

log = logging.getLogger(__name__)


def prepare(
    settings: Settings,
    job: Job,
    out: Callable[[str], None] = print,
    credentials: Callable[[], RegistryCredentials] = RegistryCredentials,
    config_file: str | None = None,
) -> None:
    """Give the job a ready VM: claim an idle one from the warm pool, or boot one (cold); then
    give it to the job (its metadata and network allowances, in image mode its services and
    build container), and start the job's connection holder (`config_file` is what it loads;
    None: no holder, each stage connects by itself). On any failure, and on SIGTERM, remove the
    job's VM and raise (a system failure; JobRefused, a build failure, for an image the job may
    not or cannot use). The attempt is recorded in the job history (jobvm.journal)."""
    with journal.prepare_recorded(settings, job) as facts:
        _prepare(settings, job, out, credentials, config_file, facts)


def _prepare(
    settings: Settings,
    job: Job,
    out: Callable[[str], None],
    credentials: Callable[[], RegistryCredentials],
    config_file: str | None,
    facts: journal.PrepareFacts,
) -> None:
    timings = Timings()
    runner_alive = _runner_watch()
    say = _prefixed(out)
    plan = imagemode.check(settings, job)  # before anything is made: a refused image costs nothing
    try:
        size = jobsize.job_size(dict(job.size_request), settings.vm)
    except jobsize.JobSizeError as exc:
        raise JobRefused(str(exc)) from None
    normal = jobsize.JobSize.normal(settings.vm)
    settings = jobsize.sized(settings, size)  # admission, limits and the domain get the job's size
    job_vm = naming.vm_name(settings.vm.name_prefix, job.job_id)
    image = load_base_image(settings.image.dir)
    mismatch = config_disagreements(image, settings.vm.user, settings.vm.builds_dir, settings.vm.cache_dir)
    if mismatch:
        raise ConfigError("; ".join(mismatch) + " (fix the config, or rebuild the image)")
    state = StateDir(settings.paths.state_dir)
    vm = job_vm
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv, state.job_lock(job_vm, LOCK_WAIT_S):
        with ExitStack() as held:  # the claimed pool VM's lock, once there is one
            try:
                with signals_raise_interrupted():
                    # A failed earlier attempt whose cleanup timed out may have left debris.
                    _remove_earlier_attempt(hv, settings, state, job_vm)
                    policy = boot.network_policy(settings, job.gitlab_host)
                    for note in (*policy.notes, boot.proxy_note(settings), boot.mirror_cache_only_note(settings)):
                        if note:
                            say(note)
                    runner_volume = boot.runner_volume(hv, settings, state, say)
                    ready = None
                    if size == normal:
                        ready = _claim(hv, settings, state, image, job, job_vm, runner_volume, held, say)
                        facts.claim = "" if settings.pool.size <= 0 else ("miss" if ready is None else "hit")
                    elif settings.pool.size > 0:
                        say(
                            f"this job asks for {size.describe()}; the warm pool keeps {normal.describe()}: booting a VM of its size"
                        )
                    if ready is None:
                        boot.admit(hv, settings, image)  # early: a refusal costs nothing; again at the disk
                    else:
                        vm = ready.vm  # from here a failure removes the claimed VM
                    disk = layercache.make_disk(hv, settings, state, image, job, vm)
                    layercache.say_plan(disk, say)
                    if ready is None:
                        ready = _boot_cold(
                            hv,
                            settings,
                            state,
                            image,
                            job,
                            job_vm,
                            policy,
                            runner_volume,
                            disk,
                            timings,
                            runner_alive,
                            say,
                        )
                    vm = ready.vm
                    facts.vm, facts.accel, facts.source = vm, ready.record.accel, ready.record.source
                    facts.mode = "shell" if plan is None else ("dind" if plan.dind else "image")
                    with ready:
                        _give(hv, settings, job, plan, ready, disk, policy, timings, credentials, say, runner_alive)
                        runner_alive()  # a VM handed to nobody would wait for reap
                    if config_file is not None:
                        _start_holder(settings, config_file, vm)
            except BaseException as exc:
                _roll_back(settings, state, vm, job_vm, exc)
                raise
    facts.phases = _phases(ready, timings, plan is not None)
    say(_ready_line(ready, facts.phases, size))


def _start_holder(settings: Settings, config_file: str, vm: str) -> None:
    """The job's stages are cheaper through a holder, but work without one."""
    try:
        holder.start(settings, os.path.abspath(config_file), vm)
    except OSError as exc:
        log.warning("could not start the job's connection holder (each stage connects by itself): %s", exc)


def _prefixed(out: Callable[[str], None]) -> Callable[[str], None]:
    return lambda line: out(f"{DRIVER_NAME}: {line}")


def _remove_earlier_attempt(hv: Hypervisor, settings: Settings, state: StateDir, job_vm: str) -> None:
    """Remove what an earlier prepare of this job left: its cold VM, or the pool VM it claimed."""
    teardown(hv, settings, state, job_vm)
    claimed = state.claimed_vm(job_vm)
    if claimed is not None:
        with state.job_lock(claimed, LOCK_WAIT_S):
            teardown(hv, settings, state, claimed)
            state.remove_lock_file(claimed)


def _claim(
    hv: Hypervisor,
    settings: Settings,
    state: StateDir,
    image: BaseImage,
    job: Job,
    job_vm: str,
    runner_volume: str,
    held: ExitStack,
    say: Callable[[str], None],
) -> ReadyVM | None:
    """An idle VM from the warm pool, claimed for this job and checked; None (cold boot) when
    the pool is off or has none fit."""
    if settings.pool.size <= 0:
        return None
    fingerprint = pool.current_fingerprint(settings, image, runner_volume)
    now = int(time.time())

    def for_job(record: JobRecord) -> JobRecord:
        return dataclasses.replace(
            record,
            job_id=job.job_id,
            project_id=job.project_id,
            project=job.project,
            pipeline_id=job.pipeline_id,
            runner_id=job.runner_id,
            expires=now + int(_lifetime(settings, job)),
        )

    ready = pool.claim(hv, settings, state, job_vm, fingerprint, for_job, held, say)
    if ready is None:
        say("no idle VM in the warm pool fits this job now: booting one")
    return ready


def _boot_cold(
    hv: Hypervisor,
    settings: Settings,
    state: StateDir,
    image: BaseImage,
    job: Job,
    vm: str,
    policy: netpolicy.Policy,
    runner_volume: str,
    disk: layercache.JobDisk | None,
    timings: Timings,
    runner_alive: Callable[[], bool],
    say: Callable[[str], None],
) -> ReadyVM:
    choice = choose_accel(settings, hv)
    log.info("preparing %s (%s: %s)", vm, choice.accel, choice.reason)
    now = int(time.time())
    record = JobRecord(
        vm=vm,
        job_id=job.job_id,
        project_id=job.project_id,
        project=job.project,
        pipeline_id=job.pipeline_id,
        runner_id=job.runner_id,
        created=now,
        expires=now + int(_lifetime(settings, job)),
        ip="",
        accel="",
        host_key="",
    )
    plan = boot.BootPlan(
        vm=vm,
        record=record,
        policy=policy,
        mirrors=boot.registry_mirrors(settings, say),
        runner_volume=runner_volume,
        choice=choice,
        tls_lifetime_s=_lifetime(settings, job),
        docker_disk=disk.path if disk else "",
    )
    return boot.boot_ready_vm(
        hv, settings, state, image, plan, timings, runner_alive, say, lambda: boot.admit(hv, settings, image)
    )


def _give(
    hv: Hypervisor,
    settings: Settings,
    job: Job,
    plan: imagemode.Plan | None,
    ready: ReadyVM,
    disk: layercache.JobDisk | None,
    policy: netpolicy.Policy,
    timings: Timings,
    credentials: Callable[[], RegistryCredentials],
    say: Callable[[str], None],
    runner_alive: Callable[[], bool],
) -> None:
    """Give the ready VM to the job: a pool VM gets the job's Docker disk and network
    allowances (a cold one was booted with them); in image mode, the services and the build
    container."""
    timings.mark("ready")
    if disk is not None and ready.record.source == "pool":
        layercache.plug(hv, settings, ready, disk)
        timings.mark("plugged")
    if ready.record.source == "pool" and settings.libvirt.nwfilter:
        wanted = boot.filter_parameters(settings, ready.ip, policy)
        if wanted != boot.filter_parameters(settings, ready.ip, boot.network_policy(settings)):
            mac = naming.mac_for(ipaddress.IPv4Address(ready.ip))
            hv.update_device(
                ready.vm, interface_with_filter(hv.live_xml(ready.vm), mac, settings.libvirt.nwfilter, wanted)
            )
    timings.mark("given")
    if plan is not None:
        alive = lambda: runner_alive() and ready.answering()  # noqa: E731
        imagemode.start(
            settings,
            job,
            plan,
            ready.docker,
            ready.ssh,
            ready.vm,
            credentials(),
            _lifetime(settings, job),
            _checking(say, alive),
            pulled=lambda: timings.mark("pulled"),
        )
        timings.mark("containers")


def _phases(ready: ReadyVM, timings: Timings, image_mode: bool) -> dict[str, float]:
    """Where prepare's time went, in order: for the ready line and the job history."""
    if ready.record.source == "pool" and "plugged" in timings.marks:
        phases = {
            "claim": timings.between(None, "ready"),
            "docker_disk": timings.between("ready", "plugged"),
            "give": timings.between("plugged", "given"),
        }
    elif ready.record.source == "pool":
        phases = {"claim": timings.between(None, "ready"), "give": timings.between("ready", "given")}
    else:
        phases = {
            "clone": timings.between(None, "cloned"),
            "boot_to_ssh": timings.between("started", "ssh"),
            "ssh_to_docker": timings.between("ssh", "docker"),
        }
    if image_mode:
        phases["pulls"] = timings.between("given", "pulled")
        phases["services"] = timings.between("pulled", "containers")
    phases["total"] = timings.between(None, "containers" if image_mode else "given")
    return phases


def _ready_line(ready: ReadyVM, phases: dict[str, float], size: jobsize.JobSize) -> str:
    """The prepare line: where the VM came from and where the time went."""
    parts = ", ".join(f"{name.replace('_', '-')} {seconds:.1f}s" for name, seconds in phases.items())
    return f"{ready.vm} ready at {ready.ip} ({ready.record.source}, {ready.record.accel}; {size.describe()}): {parts}"


def _runner_watch() -> Callable[[], bool]:
    """A check that raises SystemFailure once the process that started this prepare is gone:
    gitlab-runner died, so no run or cleanup will ever come for the VM being booted."""
    parent = os.getppid()

    def runner_alive() -> bool:
        if parent > 1 and os.getppid() != parent:
            raise SystemFailure(
                f"the runner process that started this prepare (pid {parent}) is gone: "
                "nobody will use or clean up this job's VM, so it is removed now"
            )
        return True

    return runner_alive


def _checking(out: Callable[[str], None], alive: Callable[[], bool]) -> Callable[[str], None]:
    """`out` that first checks `alive`: image mode says something at every step and pull, so a
    dead runner or a silent VM ends a long pull at its next line."""

    def say(line: str) -> None:
        if not alive():
            raise SystemFailure("the job's VM stopped while its images were being pulled and started")
        out(line)

    return say


def _lifetime(settings: Settings, job: Job) -> float:
    return min(job.timeout_s + settings.timeouts.expiry_margin, settings.timeouts.max_lifetime)


def _roll_back(settings: Settings, state: StateDir, vm: str, job_vm: str, exc: BaseException) -> None:
    """Remove what a failed prepare made (`vm`: the job's cold VM `job_vm`, or the pool VM it
    claimed). Never raises: the original error matters more."""
    with signals_deferred():
        if not isinstance(exc, Interrupted):
            tail = console_tail(console_log(settings, vm))
            if tail:
                log.info("last lines of %s's console:\n%s", vm, tail)
        try:
            # A fresh connection: the failure may have been libvirtd going away.
            with time_limit(settings.timeouts.cleanup, "rollback"):
                with connect(settings.libvirt.uri, naming.METADATA_NS) as fresh:
                    teardown(fresh, settings, state, vm)
                for name in {vm, job_vm}:
                    state.remove_lock_file(name)  # still held: nothing of the job is left
        except Exception as cleanup_exc:
            log.warning("rollback of %s incomplete: %s", vm, cleanup_exc)
