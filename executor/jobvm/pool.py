"""The warm pool's VMs on this host (decisions in core.pool): survey them, boot one for the
pool (the host agent's keeper), claim one for a job (prepare).

A claim is atomic between concurrent prepares: the VM's lock is taken without waiting, its
metadata read again under the lock, and only an idle VM of the current fingerprint is marked
claimed (metadata and `<state_dir>/claims/<job's cold VM name>`) before anything else happens.
Then it is resumed, its clock set, SSH and dockerd checked; a VM that fails is destroyed, never
handed out, and the next one is tried.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable
from contextlib import ExitStack

from executor.adapters import hostinfo
from executor.adapters.guest_docker import DockerUnavailable, GuestDocker, PullFailed, PullProgress
from executor.adapters.guest_ssh import GuestSSH, SSHNotReady
from executor.adapters.hypervisor import Hypervisor
from executor.adapters.statedir import StateDir
from executor.core import images, naming
from executor.core import pool as decide
from executor.core.baseimage import BaseImage
from executor.core.domain_xml import (
    POOL_BOOTING,
    POOL_CLAIMED,
    POOL_IDLE,
    JobRecord,
    metadata_xml,
    parse_job_record,
)
from executor.core.settings import Settings
from executor.core.waiting import poll, signals_deferred
from executor.errors import Interrupted, SystemFailure
from executor.jobvm import boot, journal
from executor.jobvm.accel import choose_accel
from executor.jobvm.record import alive_and_answering
from executor.jobvm.teardown import teardown

log = logging.getLogger(__name__)

CLAIM_SSH_S = 15.0  # a resumed VM answers SSH at once; a few retries for a busy host
CLAIM_CHECK_S = 10.0  # each check command after the resume
PREPULL_PROGRESS_S = 30.0  # how often the keeper's log says how a prepull goes


def current_fingerprint(settings: Settings, image: BaseImage, runner_volume: str) -> str:
    """What an idle VM must be made from now: the image, the runner binary, and every setting
    that shapes a VM as it boots (its domain, seed, daemon.json, network policy, prepulls).
    Settings read only when a job comes (pull policies, allowed images, timeouts, pool.size)
    leave idle VMs fit."""
    identity = f"{image.manifest.get('recipe_hash', '')}@{image.manifest.get('built_at', '')}"
    d = settings.docker
    shaping = {
        "libvirt": dataclasses.asdict(settings.libvirt),
        "vm": dataclasses.asdict(settings.vm),
        "limits": dataclasses.asdict(settings.limits),
        "network": dataclasses.asdict(settings.network),
        "mirror": dataclasses.asdict(settings.mirror),
        "docker": [d.registry_mirrors, d.insecure_registries, boot.extra_cas(settings)],
        "pool": [settings.pool.idle, settings.pool.prepull],
        "docker_cache": settings.docker_cache.enabled,  # a SCSI controller for the job's disk
    }
    return decide.fingerprint(identity, runner_volume, json.dumps(shaping, sort_keys=True))


def survey(hv: Hypervisor, settings: Settings, state: StateDir) -> list[decide.PoolVM]:
    """Every pool VM of ours on this host (claimed ones too), as the decisions see them."""
    found = []
    for info in hv.domains():
        if not naming.is_pool_name(settings.vm.name_prefix, info.name):
            continue
        record = parse_job_record(info.metadata) if info.metadata else None
        if record is None or record.vm != info.name or not record.pool_state:
            continue  # not ours
        found.append(
            decide.PoolVM(
                name=info.name,
                state=info.state,
                pool_state=record.pool_state,
                fingerprint=record.fingerprint,
                created=record.created,
                locked=state.lock_held(info.name),
                frozen=info.active and hostinfo.qemu_stopped(info.name),
            )
        )
    return found


def boot_pool_vm(
    hv: Hypervisor,
    settings: Settings,
    state: StateDir,
    image: BaseImage,
    fingerprint: str,
    runner_volume: str,
    say: Callable[[str], None],
    alive: Callable[[], bool] = lambda: True,
) -> str:
    """Boot one VM for the pool, under its lock: checked (SSH, dockerd, runner binary mounted),
    the prepull images pulled, then paused (pool.idle) and marked idle. Its name. On failure
    everything it made is removed and the error raised."""
    vm = naming.pool_vm_name(settings.vm.name_prefix, secrets.token_hex(naming.POOL_TOKEN_HEX // 2))
    now = int(time.time())
    record = JobRecord(
        vm=vm,
        job_id=0,
        project_id=None,
        project="",
        pipeline_id=None,
        runner_id=None,
        created=now,
        expires=now + int(settings.pool.max_idle),
        ip="",
        accel="",
        host_key="",
        pool_state=POOL_BOOTING,
        fingerprint=fingerprint,
    )
    with state.job_lock(vm, 0):
        try:
            plan = boot.BootPlan(
                vm=vm,
                record=record,
                policy=boot.network_policy(settings),
                mirrors=boot.registry_mirrors(settings, say),
                runner_volume=runner_volume,
                choice=choose_accel(settings, hv),
                tls_lifetime_s=settings.pool.max_idle + settings.timeouts.max_lifetime,
            )
            with boot.boot_ready_vm(
                hv,
                settings,
                state,
                image,
                plan,
                boot.Timings(),
                alive,
                say,
                lambda: boot.admit(hv, settings, image, vms=2),  # room for a cold job after it
            ) as ready:
                prepulled = _prepull(ready, settings.pool.prepull, say)
                if prepulled:
                    _warm_container_runtime(ready, prepulled[0], say)
                _start_clock_helper(settings, ready)
            if settings.pool.idle == "paused":
                hv.suspend(vm)
            idle = dataclasses.replace(ready.record, pool_state=POOL_IDLE, prepulled=prepulled)
            _write_record(hv, idle)
        except BaseException:
            with signals_deferred():
                discard(hv, settings, state, vm)
            raise
    return vm


def _warm_container_runtime(ready: boot.ReadyVM, image: str, say: Callable[[str], None]) -> None:
    """Run and remove one container, so that the job's first container start finds the
    container runtime's binaries in the guest's page cache: the first start after boot took a
    TCG guest over 5 s. Best effort: an image without `true` only misses the warm-up."""
    started = time.monotonic()
    try:
        ready.docker.run_throwaway(image, ["true"])
    except SystemFailure as exc:
        say(f"{ready.vm}: warming its container runtime with {image} failed: {exc}")
        return
    say(f"{ready.vm}: container runtime warmed in {time.monotonic() - started:.1f}s")


def _start_clock_helper(settings: Settings, ready: boot.ReadyVM) -> None:
    """The root helper that sets the clock at the claim (core.pool.clock_helper_command)."""
    result = ready.ssh.capture(decide.clock_helper_command(settings.vm.user), timeout=CLAIM_CHECK_S)
    if not result.succeeded:
        raise SystemFailure(f"{ready.vm}: cannot start its clock helper: {result.stderr.strip()[:200]}")


def _write_record(hv: Hypervisor, record: JobRecord) -> None:
    # virDomainSetMetadata wants the element without its namespace: it adds it with our key.
    hv.set_metadata(record.vm, naming.METADATA_KEY, metadata_xml(record, namespaced=False))


def _prepull(ready: boot.ReadyVM, names: tuple[str, ...], say: Callable[[str], None]) -> tuple[str, ...]:
    """Pull each image into the idle VM (through its mirror); the ones that came."""
    pulled = []
    for name in names:
        ref = images.parse_reference(name)
        started = time.monotonic()
        last = [started]

        def progress(state: PullProgress, name: str = name, last: list[float] = last) -> None:
            if time.monotonic() - last[0] >= PREPULL_PROGRESS_S:
                last[0] = time.monotonic()
                say(f"{ready.vm}: prepulling {name}: {state.line()}")

        try:
            ready.docker.pull(ref.repository, ref.pull_tag, None, progress)
        except PullFailed as exc:  # a pool VM without one of them is still worth handing out
            say(f"{ready.vm}: could not prepull {name}: {exc}")
            continue
        say(f"{ready.vm}: prepulled {name} in {time.monotonic() - started:.1f}s")
        pulled.append(name)
    return tuple(pulled)


def discard(hv: Hypervisor, settings: Settings, state: StateDir, vm: str) -> None:
    """Remove a pool VM whose lock the caller holds (never raises: logged)."""
    try:
        teardown(hv, settings, state, vm)
        state.remove_lock_file(vm)
    except (SystemFailure, OSError) as exc:
        log.warning("could not remove the pool VM %s: %s (reap will)", vm, exc)


def claim(
    hv: Hypervisor,
    settings: Settings,
    state: StateDir,
    job_vm_name: str,
    fingerprint: str,
    for_job: Callable[[JobRecord], JobRecord],
    held: ExitStack,
    out: Callable[[str], None],
) -> boot.ReadyVM | None:
    """An idle VM of the current fingerprint, claimed for the job whose cold VM would be
    `job_vm_name` (its metadata becomes `for_job(record)`), resumed and checked; None when the
    pool has none fit. The VM's lock stays held in `held` until the caller closes it."""
    for vm in decide.claimable(survey(hv, settings, state), fingerprint):
        with ExitStack() as attempt:
            if not attempt.enter_context(state.lock_if_free(vm)):
                continue  # another prepare (or the keeper) took it first
            info = hv.domain(vm)
            if info is None:
                state.remove_lock_file(vm)  # retired between the survey and the lock
                continue
            record = parse_job_record(info.metadata) if info.metadata else None
            if record is None or record.pool_state != POOL_IDLE or record.fingerprint != fingerprint:
                continue
            state.write_claim(job_vm_name, vm)
            mine = dataclasses.replace(for_job(record), pool_state=POOL_CLAIMED)
            try:
                _write_record(hv, mine)
                ready = _wake(hv, settings, state, vm, mine)
            except BaseException as exc:
                with signals_deferred():
                    discard(hv, settings, state, vm)  # claimed for this job: nobody else may have it
                if not isinstance(exc, SystemFailure) or isinstance(exc, Interrupted):
                    raise
                out(f"the pool VM {vm} failed its check before handout ({exc}): removed, trying the next")
                journal.count(settings, journal.POOL_CLAIMS_TOTAL, {"result": "dead"})
                continue
            held.push(attempt.pop_all())
            return ready
    return None


def _ssh_after_resume(settings: Settings, state: StateDir, vm: str, record: JobRecord) -> GuestSSH:
    key = state.read_client_key(vm)
    last: list[str] = []

    def attempt() -> GuestSSH | None:
        try:
            return GuestSSH.connect(record.ip, settings.vm.user, key, record.host_key, CLAIM_SSH_S)
        except SSHNotReady as exc:
            last[:] = [str(exc)]
            return None

    ssh = poll(attempt, CLAIM_SSH_S, interval=0.2, max_interval=1.0)
    if ssh is None:
        raise SystemFailure(f"no SSH after its resume: {last[0] if last else 'no answer'}")
    return ssh


def _docker_answers(state: StateDir, vm: str, ip: str) -> GuestDocker:
    docker = boot.connect_docker(state, vm, ip, timeout=CLAIM_CHECK_S)
    try:
        docker.ping()
    except DockerUnavailable as exc:
        docker.close()
        raise SystemFailure(str(exc)) from None
    return docker


def _close_docker(answer: concurrent.futures.Future[GuestDocker]) -> None:
    if answer.exception() is None:
        answer.result().close()


def _wake(hv: Hypervisor, settings: Settings, state: StateDir, vm: str, record: JobRecord) -> boot.ReadyVM:
    """Resume the claimed VM, set its clock (a paused TCG guest's clock stood still), check
    SSH and dockerd; SystemFailure saying what failed."""
    if hostinfo.qemu_stopped(vm):
        raise SystemFailure("its QEMU process is stopped (frozen)")  # a resume would hang on it
    info = hv.domain(vm)
    if info is None or not info.active or info.io_error:
        raise SystemFailure(f"it is not running ({info.state if info else 'gone'})")
    hv.resume(vm)
    # dockerd is checked while the SSH handshake and the clock command run (both wait on the guest)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="claim-docker") as pinger:
        docker_answer = pinger.submit(_docker_answers, state, vm, record.ip)
        ssh: GuestSSH | None = None
        try:
            ssh = _ssh_after_resume(settings, state, vm, record)
            clock = ssh.capture(decide.clock_set_command(time.time()), timeout=CLAIM_CHECK_S)
            if not clock.succeeded:
                raise SystemFailure(f"cannot set its clock: {clock.stderr.strip()[:200]}")
            docker = docker_answer.result()
            answering = alive_and_answering(hv, settings, vm, ssh)
        except BaseException:
            if ssh is not None:
                ssh.close()
            docker_answer.add_done_callback(_close_docker)  # runs at once if it is done
            raise
    return boot.ReadyVM(vm, record.ip, record, ssh, docker, answering)


def retire(hv: Hypervisor, settings: Settings, state: StateDir, vm: str) -> bool:
    """Remove an unclaimed pool VM unless someone works on it or claimed it meanwhile (decided
    again under its lock); whether it was removed."""
    with state.lock_if_free(vm) as free:
        if not free:
            return False
        info = hv.domain(vm)
        record = parse_job_record(info.metadata) if info is not None and info.metadata else None
        if record is None or record.pool_state not in (POOL_IDLE, POOL_BOOTING):
            return False
        with signals_deferred():
            discard(hv, settings, state, vm)
    return True


def retire_idle(hv: Hypervisor, settings: Settings, state: StateDir) -> list[tuple[str, str]]:
    """Remove every unclaimed pool VM nobody works on (drain, the agent stopping); (name, the
    state it was in) of each removed."""
    return [
        (vm.name, vm.pool_state)
        for vm in survey(hv, settings, state)
        if vm.pool_state in (POOL_IDLE, POOL_BOOTING) and retire(hv, settings, state, vm.name)
    ]


def answers_ssh(hv: Hypervisor, settings: Settings, state: StateDir, vm: str) -> bool:
    """Whether a running idle VM accepts its SSH key now (the keeper's check in "running"
    idle mode; a paused one cannot answer and is checked at its claim)."""
    info = hv.domain(vm)
    record = parse_job_record(info.metadata) if info is not None and info.metadata else None
    if record is None:
        return False
    try:
        key = state.read_client_key(vm)
        GuestSSH.connect(record.ip, settings.vm.user, key, record.host_key, CLAIM_SSH_S).close()
    except SystemFailure:
        return False
    return True
