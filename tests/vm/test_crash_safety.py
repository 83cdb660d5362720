"""Crash safety: SIGKILL prepare anywhere, then cleanup and reap leave nothing of ours behind.

Real libvirtd, qemu and the built base image; the executor is driven like gitlab-runner drives it
(tests/vm/harness.py: every stage its own process group, killed as a group). Everything here uses
the name prefix `lvxcrash` and state/console directories under pytest's tmp, so it never touches
another runner's (or another test's) VMs; one VM at a time.

Leftovers are counted per resource class, Kata-soak style: domains, volumes (overlay and seed),
IP reservations, lock files, per-job key directories, console logs and qemu processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from executor.adapters.hostfiles import load_settings
from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.admin.listing import REMOVAL_WAIT_S
from executor.admin.listing import leftovers as host_leftovers
from executor.admin.reap import reap
from executor.core import naming
from executor.core.domain_xml import build_raw_volume, parse_job_record
from executor.core.settings import Settings
from executor.core.waiting import poll
from executor.jobvm import journal
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim, kill_group

pytestmark = pytest.mark.vm

PREFIX = "lvxcrash"
LIBVIRT_PIDFILE = "/var/run/libvirtd.pid"
LIBVIRT_SOCKET = "/var/run/libvirt/libvirt-sock"
QEMU_CONFIG_DIR = Path("/etc/libvirt/qemu")  # where qemu:///system keeps persistent definitions
RESULTS: list[str] = []


@pytest.fixture(scope="module")
def crash(host_settings, tmp_path_factory):
    """(config path, settings) for this module; starts and ends with nothing of ours on the host."""
    directory = tmp_path_factory.mktemp("crash")
    config = write_test_config(host_settings, directory, PREFIX, expiry_margin=60)
    settings = load_settings(str(config))
    # Debris of an earlier, interrupted run of this module (other state dir, same prefix).
    reap(settings, older_than=0)
    assert leftovers(settings) == {}, "leftovers of prefix lvxcrash before the first trial"
    yield config, settings
    if RESULTS:
        print("\ncrash-safety trials:\n  " + "\n  ".join(RESULTS))


def qemu_processes(vm_prefix: str) -> list[int]:
    """PIDs of qemu processes running a VM of ours (libvirt passes `-name guest=<vm>,...`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.startswith(f"guest={vm_prefix}".encode()) for arg in argv):
            pids.append(int(entry.name))
    return pids


def leftovers(settings: Settings, settled: bool = False) -> dict:
    """Everything of our prefix still on the host, qemu processes included (empty: no leak);
    `settled`: once cleanup's detached remover had time to finish."""

    def now() -> dict:
        found = host_leftovers(settings)
        qemu = qemu_processes(settings.vm.name_prefix + "-")
        return {**found, "qemu_processes": qemu} if qemu else found

    if settled:
        poll(lambda: not now(), REMOVAL_WAIT_S, interval=0.2, max_interval=1.0)
    return now()


def history_end(settings: Settings, job_id: int) -> tuple[str, str] | None:
    """How the job history says job `job_id` ended: (outcome, reason); ("", "") while it has no
    end; None without a row (a prepare killed before it wrote one, and made nothing either)."""
    rows = [r for r in journal.job_history(settings).jobs() if r.job_id == job_id]
    if not rows:
        return None
    return (rows[0].outcome, rows[0].reason) if rows[0].ended is not None else ("", "")


def why_left(settings: Settings, left: dict, reaped: subprocess.CompletedProcess | None = None) -> str:
    """What a failed leak check needs to be understood afterwards: the removers' log, reap's
    output, and who holds each leftover lock file (from /proc/locks)."""
    lines = [f"leftovers: {left}"]
    if reaped is not None:
        lines.append(f"reap said: {reaped.stdout.strip()} {reaped.stderr.strip()}")
    removers = Path(settings.paths.console_log_dir) / f"remover-{PREFIX}.log"
    if removers.exists():
        lines.append("removers' log (tail):\n" + "\n".join(removers.read_text().splitlines()[-6:]))
    state = StateDir(settings.paths.state_dir)
    held = Path("/proc/locks").read_text().splitlines()
    for vm in left.get("locks", []):
        try:
            inode = state.lock_path(vm).stat().st_ino
        except FileNotFoundError:
            continue
        holders = [line for line in held if line.split()[-3].endswith(f":{inode}")]
        lines.append(f"lock of {vm} (inode {inode}) held: {holders or 'by nobody'}")
    return "\n".join(lines)


def executor(config: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "executor", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# --- kill points --------------------------------------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    name: str
    reached: Callable[[Settings, str, float], bool]  # (settings, vm, seconds since start)
    deadline: float = 300.0  # a loaded libvirtd can take minutes to define a domain
    busy: bool = True  # poll without sleeping


def after(seconds: float) -> KillPoint:
    return KillPoint(f"after {seconds:g}s", lambda s, vm, t: t >= seconds, seconds + 30, busy=False)


def _exists(path_of: Callable[[Settings, str], Path]) -> Callable[[Settings, str, float], bool]:
    return lambda s, vm, t: path_of(s, vm).exists()


def _leases(s: Settings, vm: str, t: float) -> bool:
    # "" is a reservation created but not yet written: the earliest moment it exists.
    return any(owner in (vm, "") for owner in StateDir(s.paths.state_dir).reservations().values())


def _console(s: Settings, vm: str) -> Path:
    return Path(s.paths.console_log_dir) / f"{vm}.console.log"


def _ssh_port_open(s: Settings, vm: str, t: float) -> bool:
    ips = [ip for ip, owner in StateDir(s.paths.state_dir).reservations().items() if owner == vm]
    if not ips or not _console(s, vm).exists():
        return False
    try:
        socket.create_connection((ips[0], 22), timeout=0.5).close()
        return True
    except OSError:
        time.sleep(0.5)
        return False


EVENT_POINTS = [
    KillPoint("IP reserved", _leases),
    KillPoint("client key written", _exists(lambda s, vm: Path(s.paths.state_dir) / "jobs" / vm / "client_key")),
    KillPoint("seed volume created", _exists(lambda s, vm: Path(s.libvirt.pool_path) / naming.seed_volume_name(vm))),
    # The window between creating the overlay and defining the domain is pure Python (no I/O):
    # poll without sleeping and kill at once; the trial records whether the domain had appeared.
    KillPoint(
        "overlay created, before define",
        _exists(lambda s, vm: Path(s.libvirt.pool_path) / naming.overlay_volume_name(vm)),
    ),
    KillPoint("domain defined", _exists(lambda s, vm: QEMU_CONFIG_DIR / f"{vm}.xml")),
    KillPoint("domain started", _exists(_console)),
    KillPoint(
        "guest kernel printing", lambda s, vm, t: _console(s, vm).exists() and _console(s, vm).stat().st_size > 0, 400
    ),
]
TIME_POINTS = [after(t) for t in (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.5, 8.0)]


def kill_prepare_at(sim: RunnerSim, settings: Settings, vm: str, point: KillPoint) -> str:
    """Start prepare and SIGKILL its process group once `point` is reached. Returns what
    existed right after the kill, for the trial's record."""
    proc = sim.start("prepare")
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        if point.reached(settings, vm, elapsed):
            kill_group(proc, signal.SIGKILL)
            break
        if proc.poll() is not None:
            _out, err = proc.communicate()
            assert proc.returncode == 0, (
                f"prepare exited {proc.returncode} before {point.name}:\n{err.decode()[-3000:]}"
            )
            break  # a fast host finished prepare first: nothing to kill, cleanup still must work
        if elapsed > point.deadline:
            kill_group(proc, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{point.name} not reached within {point.deadline:.0f} s")
        # Events are polled without sleeping (the overlay-to-define window is microseconds);
        # time points sleep in small steps.
        time.sleep(0 if point.busy else 0.002)
    proc.wait()
    state = leftovers(settings)
    return ",".join(sorted(state)) or "nothing"


@pytest.mark.parametrize("point", EVENT_POINTS + TIME_POINTS, ids=lambda p: p.name.replace(" ", "-"))
def test_sigkill_prepare_then_cleanup_and_reap_leave_nothing(crash, tmp_path, point):
    config, settings = crash
    job_id = 910_000 + (EVENT_POINTS + TIME_POINTS).index(point)
    vm = naming.vm_name(PREFIX, job_id)
    sim = RunnerSim(config, tmp_path / "job", job_id)

    present = kill_prepare_at(sim, settings, vm, point)

    cleanup = sim.cleanup(timeout=120)
    assert cleanup.rc == 0, cleanup.describe()
    reaped = executor(config, "reap")
    assert reaped.returncode == 0, reaped.stdout + reaped.stderr
    left = leftovers(settings, settled=True)
    RESULTS.append(f"kill prepare at {point.name:<32} present after kill: {present:<60} leftovers: {left or 'none'}")
    assert left == {}, why_left(settings, left, reaped)
    # The killed prepare's row says so (a fast host may have finished prepare before the kill).
    assert history_end(settings, job_id) in (("canceled", "killed"), ("success", ""))


@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_sigkill_cleanup_then_cleanup_again(crash, tmp_path, delay):
    """cleanup itself killed half-way (the runner's own kill): the next cleanup finishes it."""
    config, settings = crash
    job_id = 920_000 + int(delay * 10)
    vm = naming.vm_name(PREFIX, job_id)
    sim = RunnerSim(config, tmp_path / "job", job_id)
    kill_prepare_at(sim, settings, vm, EVENT_POINTS[5])  # domain started
    proc = sim.start("cleanup")
    time.sleep(delay)
    kill_group(proc, signal.SIGKILL)
    proc.wait()
    second = sim.cleanup(timeout=120)
    assert second.rc == 0, second.describe()
    reaped = executor(config, "reap")
    assert reaped.returncode == 0, reaped.stdout + reaped.stderr
    left = leftovers(settings, settled=True)
    RESULTS.append(f"kill cleanup after {delay}s, cleanup again + reap: leftovers: {left or 'none'}")
    assert left == {}, why_left(settings, left, reaped)


@pytest.mark.parametrize(
    "point,job_id",
    [(after(0.2), 930_001), (EVENT_POINTS[3], 930_002), (EVENT_POINTS[4], 930_003), (EVENT_POINTS[5], 930_004)],
    ids=["after-0.2s", "overlay-created", "domain-defined", "domain-started"],
)
def test_runner_dies_during_prepare_reap_alone_cleans_up(crash, tmp_path, point, job_id):
    """No cleanup at all (runner crashed too): reap removes orphans and stopped domains now,
    and a domain that is still running only once it expires."""
    config, settings = crash
    vm = naming.vm_name(PREFIX, job_id)
    sim = RunnerSim(config, tmp_path / "job", job_id)
    present = kill_prepare_at(sim, settings, vm, point)

    assert executor(config, "reap").returncode == 0
    left = leftovers(settings)
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        info = hv.domain(vm)
    if info is not None and info.active:  # a running VM of ours: kept until its expiry
        assert set(left) <= {
            "domains",
            "volumes",
            "ip_reservations",
            "locks",
            "job_dirs",
            "console_logs",
            "qemu_processes",
        }
        assert left["domains"] == [vm]
        record = parse_job_record(info.metadata)
        assert reap(settings, now=record.expires - 1).actions == []
        assert leftovers(settings)["domains"] == [vm]
        assert reap(settings, now=record.expires).failures == []
        left = leftovers(settings)
    RESULTS.append(f"runner death at {point.name:<32} (no cleanup), reap: leftovers: {left or 'none'}")
    assert left == {}
    # No cleanup came: reap ended the job's row, blaming the infrastructure. A prepare that died
    # before it made anything left at most its row, which reap ends once no job could still
    # live (timeouts.max_lifetime; unit-tested in test_reap).
    end = history_end(settings, job_id)
    assert end == ("system_failure", "no_cleanup") or (end in (None, ("", "")) and present == "nothing"), (end, present)


def test_kill_prepare_when_ssh_is_up(crash, tmp_path):
    """The latest kill point: the guest is up and prepare is waiting for dockerd."""
    config, settings = crash
    point = KillPoint("SSH port open", _ssh_port_open, 300, busy=False)
    job_id = 940_001
    vm = naming.vm_name(PREFIX, job_id)
    sim = RunnerSim(config, tmp_path / "job", job_id)
    present = kill_prepare_at(sim, settings, vm, point)
    cleanup = sim.cleanup(timeout=120)
    assert cleanup.rc == 0, cleanup.describe()
    reaped = executor(config, "reap")
    assert reaped.returncode == 0, reaped.stdout + reaped.stderr
    left = leftovers(settings, settled=True)
    RESULTS.append(f"kill prepare at {point.name:<32} present after kill: {present:<60} leftovers: {left or 'none'}")
    assert left == {}, why_left(settings, left, reaped)


# --- a job whose cleanup never ran --------------------------------------------------------------


def test_job_without_cleanup_is_reaped_after_expiry_and_not_before(crash, tmp_path):
    config, settings = crash
    job_id = 950_001
    vm = naming.vm_name(PREFIX, job_id)
    sim = RunnerSim(config, tmp_path / "job", job_id, timeout_s=600)
    try:
        prepared = sim.prepare(timeout=600)
        assert prepared.rc == 0, prepared.describe()
        with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
            record = parse_job_record(hv.domain(vm).metadata)
        assert record.expires - record.created == 600 + 60  # job timeout + expiry_margin

        # The runner crashed: no cleanup. A reaper every minute must leave the job alone...
        reaped = executor(config, "reap")
        assert reaped.returncode == 0 and vm not in reaped.stdout, reaped.stdout
        listing = json.loads(executor(config, "list", "--json").stdout)
        assert [(v["name"], v["state"], v["expired"], v["busy"]) for v in listing["vms"]] == [
            (vm, "running", False, False)
        ]
        assert listing["orphans"] == []
        assert reap(settings, now=record.expires - 1).actions == []
        run = sim.run("echo still-$((6*7))")  # ...and the job still works
        assert run.rc == 0 and "still-42" in run.stdout, run.describe()

        # ...until its expiry has passed.
        result = reap(settings, now=record.expires)
        assert (
            result.failures == []
            and len(result.actions) == 1
            and result.actions[0].startswith(f"removed {vm} (expired")
        )
        assert leftovers(settings) == {}
    finally:
        sim.cleanup(timeout=120)
    RESULTS.append("runner crashed after prepare: kept until expiry, reaped at expiry: leftovers: none")


# --- not ours -----------------------------------------------------------------------------------


def test_reap_ignores_a_domain_that_is_not_ours(crash):
    """A domain with our name but without our metadata, and a volume named after it: untouched."""
    import libvirt

    config, settings = crash
    vm = naming.vm_name(PREFIX, 960_001)
    xml = (
        f"<domain type='qemu'><name>{vm}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
    )
    conn = libvirt.open(settings.libvirt.uri)
    try:
        conn.defineXML(xml)
        with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
            hv.create_volume(settings.libvirt.pool, build_raw_volume(naming.overlay_volume_name(vm), 4096))
        for args in (("reap",), ("reap", "--older-than", "0s")):
            reaped = executor(config, *args)
            assert reaped.returncode == 0, reaped.stdout + reaped.stderr
        assert reap(settings, older_than=0, now=time.time() + 10**9).actions == []
        left = leftovers(settings)
        assert left.get("domains") == [vm] and left.get("volumes") == [naming.overlay_volume_name(vm)]
        listing = executor(config, "list", "--json")
        assert vm not in listing.stdout  # not listed as ours either
        assert conn.lookupByName(vm) is not None
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(vm).undefine()
        with contextlib.suppress(libvirt.libvirtError):
            conn.storagePoolLookupByName(settings.libvirt.pool).storageVolLookupByName(
                naming.overlay_volume_name(vm)
            ).delete(0)
        conn.close()
    assert leftovers(settings) == {}
    RESULTS.append("domain and volume with our name but no metadata: untouched by reap")


# --- libvirtd restarted during a job -------------------------------------------------------------


def _libvirtd_pid() -> int:
    return int(Path(LIBVIRT_PIDFILE).read_text().strip())


def _wait_for_libvirt(uri: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with connect(uri, naming.METADATA_NS) as hv:
                hv.domains()
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_libvirtd_restart_during_a_job(crash, tmp_path):
    """libvirtd goes away between stages and comes back. QEMU is not libvirtd's child, so the
    VM survives: a stage that runs while libvirtd is down fails fast as a system failure (never
    a build failure, never a hang); the next stage, after the restart, works; cleanup removes
    everything."""
    config, settings = crash
    job_id = 970_001
    vm = naming.vm_name(PREFIX, job_id)
    sim = RunnerSim(config, tmp_path / "job", job_id)
    try:
        prepared = sim.prepare(timeout=600)
        assert prepared.rc == 0, prepared.describe()
        (qemu_before,) = qemu_processes(vm)

        pid = _libvirtd_pid()
        os.kill(pid, signal.SIGTERM)  # by its pid file, never by name
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists(), "libvirtd did not exit"
        try:
            down = sim.run("echo must-not-run", timeout=120)
            assert down.rc == 2, down.describe()  # SYSTEM_FAILURE_EXIT_CODE
            assert "must-not-run" not in down.stdout
            assert down.seconds < 60
        finally:
            subprocess.run(["libvirtd", "-d"], check=True)
            _wait_for_libvirt(settings.libvirt.uri)

        assert qemu_processes(vm) == [qemu_before], "the VM did not survive the libvirtd restart"
        up = sim.run("echo alive-$((6*7))")
        assert up.rc == 0 and "alive-42" in up.stdout, up.describe()
    finally:
        if not os.path.exists(LIBVIRT_SOCKET):
            subprocess.run(["libvirtd", "-d"], check=False)
            _wait_for_libvirt(settings.libvirt.uri)
        cleanup = sim.cleanup(timeout=120)
    assert cleanup.rc == 0, cleanup.describe()
    assert leftovers(settings, settled=True) == {}
    RESULTS.append(
        "libvirtd restarted between prepare and run: run during outage -> system failure, after -> ok; leftovers: none"
    )


def test_zz_requests_a_killed_prepare_left_in_libvirtd_are_reaped_too(crash):
    """Last in the module. A prepare killed while its defineXML was queued in libvirtd leaves a
    request that libvirtd still completes after the client is gone, possibly after that
    trial's cleanup and reap: a domain appears, defined and shut off. The next reap removes it
    (it is ours and not running). Wait for libvirtd to drain, reaping like a timer would."""
    config, settings = crash
    deadline = time.monotonic() + 300
    while True:
        reaped = executor(config, "reap")
        assert reaped.returncode == 0, reaped.stdout + reaped.stderr
        left = leftovers(settings)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(5)
    RESULTS.append(f"late-completing libvirt requests, reaped like a timer: leftovers: {left or 'none'}")
    assert left == {}
