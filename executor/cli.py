"""Command line: thin click commands that parse, load and call `stages` / `admin`.

The stage and admin modules are imported inside each command: `config` and `run` start in a
fraction of the time the whole package (libvirt, paramiko, cryptography) would take.

Exit codes are never click's: `main` runs click with standalone_mode=False and maps every
outcome through `errors.exit_code_for`, because click's 1 (ClickException/Abort) and 2
(UsageError) are exactly gitlab-runner's build and system failure codes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from executor import __version__, errors
from executor.adapters.hostfiles import load_job, load_registry_credentials, load_settings, write_build_exit_code
from executor.core.jobenv import Job
from executor.core.settings import Settings, config_path

log = logging.getLogger("executor")


class _Context:
    def __init__(self, config: str | None) -> None:
        self.config_file = config_path(config, os.environ)
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_file)
        return self._settings


def _job() -> Job:
    return load_job(os.environ)


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("libvirt-executor: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config",
    metavar="PATH",
    help="Config file (default: $LIBVIRT_EXECUTOR_CONFIG or /etc/libvirt-executor/config.toml).",
)
@click.option("--debug", is_flag=True, help="Log libvirt and SSH details to stderr.")
@click.version_option(__version__, prog_name="libvirt-executor")
@click.pass_context
def cli(ctx: click.Context, config: str | None, debug: bool) -> None:
    """GitLab Runner custom executor: every CI job in its own throwaway libvirt VM."""
    setup_logging(debug)
    ctx.obj = _Context(config)


# --- the four stages gitlab-runner calls --------------------------------------------------


@cli.command("config")
@click.pass_obj
def config_cmd(obj: _Context) -> None:
    """config_exec: print the driver's JSON (only JSON) on stdout."""
    from executor.stages.config import config_json

    click.echo(json.dumps(config_json(obj.settings, _job())))


@cli.command("prepare")
@click.pass_obj
def prepare_cmd(obj: _Context) -> None:
    """prepare_exec: create and boot the job's VM, wait for SSH and Docker."""
    from executor.stages.prepare import prepare

    job = _job()
    prepare(
        obj.settings,
        job,
        out=click.echo,
        credentials=lambda: load_registry_credentials(os.environ),
        config_file=os.path.abspath(obj.config_file),
    )


@cli.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("script", type=click.Path(dir_okay=False))
@click.argument("stage")
@click.pass_obj
def run_cmd(obj: _Context, script: str, stage: str) -> None:
    """run_exec: run SCRIPT (the runner's stage script) for STAGE inside the job's VM."""
    from executor.stages.run import run

    try:
        run(obj.settings, _job(), script, stage)
    except errors.BuildFailure as exc:
        write_build_exit_code(exc.exit_status, os.environ)
        raise


@cli.command("hold-connection", hidden=True)
@click.argument("vm")
@click.option("--fd", "listen_fd", type=int, required=True, help="The listening socket prepare passes on.")
@click.pass_obj
def hold_connection_cmd(obj: _Context, vm: str, listen_fd: int) -> None:
    """The job's connection holder (started by prepare, detached): runs the job's stages over
    one SSH connection until the job's VM is gone."""
    from executor.stages.holder import serve

    serve(obj.settings, _job(), vm, listen_fd)


@cli.command("cleanup")
@click.pass_obj
def cleanup_cmd(obj: _Context) -> None:
    """cleanup_exec: destroy the job's VM; everything it used is removed in the background."""
    from executor.stages.cleanup import cleanup

    cleanup(obj.settings, _job(), config_file=os.path.abspath(obj.config_file))


@cli.command("remove-job", hidden=True)
@click.argument("job_id", type=int)
@click.pass_obj
def remove_job_cmd(obj: _Context, job_id: int) -> None:
    """Cleanup's detached remover: remove everything of job JOB_ID's (destroyed) VM."""
    from executor.stages.cleanup import remove

    remove(obj.settings, job_id)


# --- operator commands --------------------------------------------------------------------


@cli.command("setup")
@click.option(
    "--example",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Template for a missing config file (default: the config.example.toml shipped with the source).",
)
@click.pass_obj
def setup_cmd(obj: _Context, example: str | None) -> None:
    """Create what the executor needs on this host (idempotent): config, directories,
    storage pool, network, and the registry mirror (running)."""
    from executor.admin.setup import setup_host

    changes = setup_host(obj.config_file, example)
    for line in changes:
        click.echo(f"setup: {line}")
    if not changes:
        click.echo("setup: nothing to do, the host is already set up")


@cli.group("image")
def image_group() -> None:
    """Base image commands."""


@image_group.command("build")
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Output directory (default: image.dir from the config).",
)
@click.option(
    "--preload",
    type=click.Path(dir_okay=False, exists=True),
    multiple=True,
    help="Docker image tarball (docker save) to make available in every VM.",
)
@click.option("--force", is_flag=True, help="Rebuild even if the recipe is unchanged.")
@click.pass_obj
def image_build_cmd(obj: _Context, output: str | None, preload: tuple[str, ...], force: bool) -> None:
    """Build the base image with debootstrap (root only; a few minutes; cached)."""
    from executor.admin import imagebuild
    from executor.core.settings import ImageSettings

    if output is None:
        try:
            output = obj.settings.image.dir
        except errors.ConfigError:
            if Path(obj.config_file).exists():
                raise
            output = ImageSettings().dir
    manifest = imagebuild.build_image(Path(output), [Path(p) for p in preload], force=force)
    click.echo(f"image: {output} (recipe {str(manifest.get('recipe_hash', ''))[:12]})")


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON for scripts instead of a table.")
@click.pass_obj
def list_cmd(obj: _Context, as_json: bool) -> None:
    """Every VM of this executor (name, job, project, state, IP, age, expiry, accelerator),
    plus volumes, keys, locks and IP reservations left without a VM."""
    from executor.admin import listing

    found = listing.list_vms(obj.settings)
    click.echo(listing.format_json(found) if as_json else listing.format_table(found))


@cli.command("reap")
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
@click.option(
    "--older-than",
    metavar="DURATION",
    default=None,
    help="Also remove VMs created at least this long ago (e.g. 90m, 6h, 2d), expired or not.",
)
@click.pass_obj
def reap_cmd(obj: _Context, dry_run: bool, older_than: str | None) -> None:
    """Remove VMs past their expiry and every orphaned volume, seed, key, lock and IP
    reservation. Never touches a VM a stage is working on, or anything not ours.
    Safe to run every minute from cron or a timer."""
    from executor.admin.reap import reap
    from executor.core import reaping

    seconds = None
    if older_than is not None:
        try:
            seconds = reaping.parse_duration(older_than)
        except ValueError as exc:
            raise errors.ConfigError(f"--older-than: {exc}") from None
    result = reap(obj.settings, dry_run=dry_run, older_than=seconds)
    for line in result.actions:
        click.echo(f"reap: {line}")
    for line in result.skipped:
        click.echo(f"reap: skipped {line}")
    if not result.actions and not result.failures:
        click.echo("reap: nothing to do")
    if result.failures:
        raise errors.SystemFailure("reap: could not remove " + "; ".join(result.failures))
    if result.interrupted:
        raise errors.Interrupted()


@cli.command("doctor")
@click.option("--boot", is_flag=True, help="Also boot one probe VM end to end (SSH and dockerd), then remove it.")
@click.pass_obj
def doctor_cmd(obj: _Context, boot: bool) -> None:
    """Check the host: config, libvirt, accelerator, pool, disk space, network, base image,
    mirror. One line per check with the fix; exits non-zero if anything is broken."""
    from executor.admin.doctor import doctor

    checks = doctor(obj.config_file, boot=boot, out=lambda check: click.echo(check.line()))
    failed = [c.name for c in checks if c.ok is False]
    if failed:
        raise errors.ConfigError(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}")


@cli.command("env")
@click.argument("job_id", type=click.IntRange(min=1))
@click.pass_obj
def env_cmd(obj: _Context, job_id: int) -> None:
    """Print DOCKER_HOST, DOCKER_TLS_VERIFY and DOCKER_CERT_PATH for a running job's dockerd
    (eval "$(libvirt-executor env JOB_ID)"), like docker-machine env. Root only."""
    from executor.admin.access import docker_env

    for line in docker_env(obj.settings, job_id):
        click.echo(line)


@cli.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("job_id", type=click.IntRange(min=1))
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def ssh_cmd(obj: _Context, job_id: int, command: tuple[str, ...]) -> None:
    """A shell in a running job's VM as the job user (or COMMAND, joined with spaces as ssh
    does), with the job's key and its pinned host key, like docker-machine ssh. Root only.
    Exits with the command's status."""
    from executor.admin.access import ssh_session

    status = ssh_session(
        obj.settings,
        job_id,
        " ".join(command) if command else None,
        sys.stdin.fileno(),
        sys.stdout.buffer,
        sys.stderr.buffer,
    )
    if status:
        raise click.exceptions.Exit(status)


@cli.group("mirror")
def mirror_group() -> None:
    """The registry mirror: a pull-through cache on this host for every job VM's dockerd."""


@mirror_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def mirror_status_cmd(obj: _Context, as_json: bool) -> None:
    """Up or not, upstream, disk used, cached repositories, hits and misses. Exits non-zero
    when the mirror is enabled but not answering."""
    from executor.admin import mirror

    st = mirror.status(obj.settings)
    click.echo(json.dumps(mirror.status_dict(st), indent=2) if as_json else mirror.format_status(st))
    if st.enabled and not st.answering:
        raise errors.SystemFailure(f"mirror: {st.url} is not answering ({st.problem})")


@mirror_group.command("start")
@click.pass_obj
def mirror_start_cmd(obj: _Context) -> None:
    """Start the mirror's supervisor (in the background) unless it is running."""
    from executor.admin import mirror

    click.echo(f"mirror: {mirror.start(obj.settings, obj.config_file)}")


@mirror_group.command("stop")
@click.pass_obj
def mirror_stop_cmd(obj: _Context) -> None:
    """Stop the mirror (jobs then pull from the registries directly)."""
    from executor.admin import mirror

    click.echo(f"mirror: {mirror.stop(obj.settings)}")


@mirror_group.command("serve")
@click.pass_obj
def mirror_serve_cmd(obj: _Context) -> None:
    """Run the mirror's supervisor in the foreground until SIGTERM (what `mirror start` and the
    systemd unit run)."""
    from executor.admin import mirror

    mirror.serve(obj.settings, say=lambda line: click.echo(f"mirror: {line}"))


@mirror_group.command("prune")
@click.pass_obj
def mirror_prune_cmd(obj: _Context) -> None:
    """Bring the cache within mirror.max_gib now (the supervisor also does it every few minutes)."""
    from executor.admin import mirror

    for line in mirror.prune(obj.settings, obj.config_file):
        click.echo(f"mirror: {line}")


@cli.group("agent", invoke_without_command=True)
@click.pass_context
def agent_group(ctx: click.Context) -> None:
    """The host agent (warm pool keeper). Without a subcommand: run it in the foreground until
    SIGTERM (what its systemd unit and `agent start` run). One per host and name prefix."""
    if ctx.invoked_subcommand is not None:
        return
    import time

    from executor.admin.observe import families
    from executor.agent.main import serve

    obj: _Context = ctx.obj
    serve(
        obj.settings,
        obj.config_file,
        say=lambda line: click.echo(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} agent: {line}"),
        collect=lambda agent_status: families(obj.settings, agent_status),
    )


@agent_group.command("start")
@click.pass_obj
def agent_start_cmd(obj: _Context) -> None:
    """Start the supervised agent (systemd unit, or detached) unless it runs."""
    from executor.agent import client

    click.echo(f"agent: {client.start(obj.settings, obj.config_file)}")


@agent_group.command("stop")
@click.pass_obj
def agent_stop_cmd(obj: _Context) -> None:
    """Stop the agent; it removes its idle VMs first (jobs then boot cold)."""
    from executor.agent import client

    click.echo(f"agent: {client.stop(obj.settings)}")


@cli.group("pool")
def pool_group() -> None:
    """The warm pool: idle VMs booted before their job ([pool] in the config)."""


@pool_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def pool_status_cmd(obj: _Context, as_json: bool) -> None:
    """Idle (ready to hand out), booting and in-job pool VMs, and the agent."""
    from executor.admin import pool

    st = pool.status(obj.settings)
    click.echo(json.dumps(st, indent=2, sort_keys=True) if as_json else pool.format_status(st))


@pool_group.command("drain")
@click.pass_obj
def pool_drain_cmd(obj: _Context) -> None:
    """Stop refilling the pool and remove its idle VMs now (for maintenance); `pool fill` undoes it."""
    from executor.admin import pool

    for line in pool.drain(obj.settings):
        click.echo(f"pool: {line}")


@pool_group.command("fill")
@click.pass_obj
def pool_fill_cmd(obj: _Context) -> None:
    """Let the agent refill a drained pool."""
    from executor.admin import pool

    click.echo(f"pool: {pool.fill(obj.settings)}")


@cli.group("docker-cache")
def docker_cache_group() -> None:
    """The per-project Docker layer cache ([docker_cache] in the config; `list` shows it)."""


@docker_cache_group.command("prune")
@click.option(
    "--project", "project_id", type=click.IntRange(min=1), default=None, help="Only this project id's lineages."
)
@click.pass_obj
def docker_cache_prune_cmd(obj: _Context, project_id: int | None) -> None:
    """Drop the lineages (every one, or one project's): the next jobs start with empty Docker
    disks. Disks of running jobs are deleted when those jobs end, without being kept."""
    from executor.admin import dockercache

    for line in dockercache.prune(obj.settings, project_id):
        click.echo(f"docker-cache: {line}")


@cli.command("jobs")
@click.option(
    "--since",
    default="1d",
    show_default=True,
    metavar="DURATION",
    help="Jobs that started this long ago or later (90s, 30m, 2h, 7d).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output, with each stage.")
@click.pass_obj
def jobs_cmd(obj: _Context, since: str, as_json: bool) -> None:
    """The recent jobs from the job history, newest first: where each one's time went."""
    import dataclasses
    import time

    from executor.admin.observe import recent_jobs
    from executor.core.history import format_table
    from executor.core.reaping import parse_duration

    try:
        seconds = parse_duration(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    rows = recent_jobs(obj.settings, time.time() - seconds)
    if as_json:
        click.echo(json.dumps({"jobs": [dataclasses.asdict(r) for r in rows]}, indent=2, sort_keys=True))
    else:
        click.echo(format_table(rows))


@cli.command("metrics")
@click.pass_obj
def metrics_cmd(obj: _Context) -> None:
    """Print the Prometheus metrics the host agent serves (from this process: no agent needed)."""
    from executor.adapters.prometheus import exposition
    from executor.admin.observe import families

    sys.stdout.buffer.write(exposition(lambda: families(obj.settings)))


@cli.command("demo")
@click.pass_obj
def demo_cmd(obj: _Context) -> None:
    """Run one demo job end to end (clone, docker run) in a fresh VM, as gitlab-runner would."""
    from executor.admin.demo import run_demo

    run_demo(obj.settings, obj.config_file, say=click.echo)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and exit with a code gitlab-runner understands."""
    args = sys.argv[1:] if argv is None else argv
    try:
        # Without standalone mode click returns an Exit's code (`ssh`'s remote status) instead
        # of raising it.
        returned = cli.main(args=args, prog_name="libvirt-executor", standalone_mode=False)
        code = returned if isinstance(returned, int) else 0
    except click.exceptions.Exit as exc:  # --help, --version
        code = exc.exit_code
    except click.ClickException as exc:  # usage errors: our caller is misconfigured
        exc.show()
        code = errors.exit_code_for(errors.ConfigError(exc.format_message()), os.environ)
    except click.exceptions.Abort:  # click's wrapper around KeyboardInterrupt
        log.error("error: interrupted by SIGINT")
        code = errors.exit_code_for(errors.Interrupted("SIGINT"), os.environ)
    except errors.BuildFailure as exc:
        if isinstance(exc, errors.JobRefused):  # the job log must say why the job cannot run
            log.error("error: %s", errors.describe(exc))
        code = errors.exit_code_for(exc, os.environ)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            code = 0
        else:
            log.error("error: %s", errors.describe(exc))
            log.debug("details", exc_info=True)
            code = errors.exit_code_for(exc, os.environ)
    sys.stdout.flush()
    sys.exit(code)
