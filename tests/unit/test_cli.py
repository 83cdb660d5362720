"""executor.cli.main: the real entry point, so the exit-code mapping is what is tested."""

from __future__ import annotations

import json
import os

import pytest

from executor import __version__, cli
from executor.errors import Interrupted, SystemFailure

BUILD, SYSTEM = 11, 12


@pytest.fixture(autouse=True)
def runner_env(monkeypatch, tmp_path):
    """The environment gitlab-runner gives every stage, with non-default failure codes so that
    click's own 1/2 cannot pass for ours."""
    for key in list(os.environ):
        if key.startswith("CUSTOM_ENV_") or key in (
            "LIBVIRT_EXECUTOR_CONFIG",
            "JOB_RESPONSE_FILE",
            "BUILD_EXIT_CODE_FILE",
        ):
            monkeypatch.delenv(key)
    monkeypatch.setenv("BUILD_FAILURE_EXIT_CODE", str(BUILD))
    monkeypatch.setenv("SYSTEM_FAILURE_EXIT_CODE", str(SYSTEM))
    monkeypatch.setenv("BUILD_EXIT_CODE_FILE", str(tmp_path / "build_exit_code"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[libvirt]
uri = "test:///default"
pool = "default-pool"
pool_path = "{tmp_path}/pool"
[image]
dir = "{tmp_path}/image"
[vm]
name_prefix = "ci"
builds_dir = "/srv/builds"
cache_dir = "/srv/cache"
[paths]
state_dir = "{tmp_path}/state"
console_log_dir = "{tmp_path}/console"
"""
    )
    return path


@pytest.fixture
def payload_file(tmp_path, monkeypatch):
    path = tmp_path / "response.json"
    path.write_text(
        json.dumps(
            {
                "id": 4242,
                "token": "glcbt-secret",
                "variables": [{"key": "CI_JOB_ID", "value": "1"}, {"key": "CI_PROJECT_PATH", "value": "g/p"}],
            }
        )
    )
    monkeypatch.setenv("JOB_RESPONSE_FILE", str(path))
    return path


def run(argv) -> int:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code


@pytest.mark.parametrize(
    "argv",
    [
        ["--no-such-option"],
        ["config", "--no-such-option"],
        ["run"],  # missing SCRIPT and STAGE
        ["run", "script-only"],
        ["config", "unexpected-argument"],
        ["no-such-command"],
        [],
        ["image"],
        ["image", "build", "--preload", "/nonexistent/image.tar"],
    ],
)
def test_usage_errors_are_system_failures_never_clicks_2(argv, capsys):
    assert run(argv) == SYSTEM
    assert capsys.readouterr().out == ""


def test_usage_error_is_explained_on_stderr(capsys):
    assert run(["--no-such-option"]) == SYSTEM
    assert "no-such-option" in capsys.readouterr().err


def test_usage_errors_use_the_default_system_code_without_the_env(monkeypatch):
    monkeypatch.delenv("SYSTEM_FAILURE_EXIT_CODE")
    assert run(["--no-such-option"]) == 2


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["config", "--help"], ["run", "--help"]])
def test_help_is_success(argv, capsys):
    assert run(argv) == 0
    assert "Usage:" in capsys.readouterr().out


def test_version_is_success(capsys):
    assert run(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["config", "prepare", "cleanup"])
def test_missing_config_file_is_a_system_failure_with_the_hint(stage, tmp_path, payload_file, capsys):
    missing = tmp_path / "absent.toml"
    assert run(["--config", str(missing), stage]) == SYSTEM
    out, err = capsys.readouterr()
    assert out == ""
    assert str(missing) in err and "does not exist" in err and "libvirt-executor setup" in err


def test_config_path_from_the_environment(monkeypatch, tmp_path, payload_file, capsys):
    monkeypatch.setenv("LIBVIRT_EXECUTOR_CONFIG", str(tmp_path / "from-env.toml"))
    assert run(["config"]) == SYSTEM
    assert "from-env.toml" in capsys.readouterr().err


def test_invalid_config_is_a_system_failure_listing_problems(tmp_path, payload_file, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[vm]\nvcpus = 0\n[libvirt]\naccel = "xen"\n')
    assert run(["--config", str(bad), "config"]) == SYSTEM
    err = capsys.readouterr().err
    assert "vm.vcpus" in err and "libvirt.accel" in err


@pytest.mark.parametrize(
    "setup",
    [
        "unset",
        "missing",
        "directory",
        "not-json",
        "no-id",
        "zero-id",
    ],
)
def test_bad_job_response_file_is_a_system_failure(setup, config_file, tmp_path, monkeypatch, capsys):
    path = tmp_path / "response.json"
    if setup == "unset":
        monkeypatch.delenv("JOB_RESPONSE_FILE", raising=False)
    else:
        monkeypatch.setenv("JOB_RESPONSE_FILE", str(tmp_path if setup == "directory" else path))
        if setup == "not-json":
            path.write_text("{not json")
        elif setup == "no-id":
            path.write_text('{"token": "x"}')
        elif setup == "zero-id":
            path.write_text('{"id": 0}')
    assert run(["--config", str(config_file), "config"]) == SYSTEM
    out, err = capsys.readouterr()
    assert out == ""
    assert "error:" in err


def test_config_prints_only_json(config_file, payload_file, capsys, monkeypatch):
    monkeypatch.setenv("CUSTOM_ENV_CI_JOB_ID", "1")  # a job can set this; it must not matter
    assert run(["--config", str(config_file), "config"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)  # the whole of stdout is one JSON document
    assert out.strip().startswith("{") and out.count("\n") == 1
    assert data["builds_dir"] == "/srv/builds"
    assert data["cache_dir"] == "/srv/cache"
    assert data["hostname"] == "ci-job-4242"
    assert data["driver"] == {"name": "libvirt-executor", "version": __version__}
    assert data["builds_dir_is_shared"] is False
    assert "glcbt-secret" not in out + err


def test_config_with_debug_still_prints_only_json(config_file, payload_file, capsys):
    assert run(["--debug", "--config", str(config_file), "config"]) == 0
    json.loads(capsys.readouterr().out)


def test_config_does_not_create_anything(config_file, payload_file, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run(["--config", str(config_file), "config"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_run_with_a_missing_script_is_a_system_failure_not_a_build_failure(config_file, payload_file, tmp_path):
    # `run` cannot reach a VM here (there is none), whatever happens it must not blame the job
    code = run(["--config", str(config_file), "run", str(tmp_path / "no-script"), "build_script"])
    assert code == SYSTEM
    assert not (tmp_path / "build_exit_code").exists()


# --- the mapping of stage outcomes (stages replaced: no VM in the unit tier) --------------------


def _script(tmp_path):
    script = tmp_path / "script"
    script.write_text("exit 42\n")
    return str(script)


def test_build_failure_exits_with_the_build_code_and_writes_the_status(
    config_file, payload_file, tmp_path, monkeypatch, capsys
):
    from executor.errors import BuildFailure
    from executor.stages import run as run_stage

    def fake_run(settings, job, script, stage):
        assert job.job_id == 4242 and stage == "build_script"
        raise BuildFailure(42)

    (tmp_path / "build_exit_code").write_text("999\n")  # stale, from an earlier stage
    monkeypatch.setattr(run_stage, "run", fake_run)
    assert run(["--config", str(config_file), "run", _script(tmp_path), "build_script"]) == BUILD
    assert (tmp_path / "build_exit_code").read_text() == "42\n"


@pytest.mark.parametrize(
    "exc",
    [
        SystemFailure("VM died"),
        Interrupted("SIGTERM"),
        ValueError("a bug"),
        KeyboardInterrupt(),
    ],
)
def test_anything_else_in_a_stage_is_a_system_failure(exc, config_file, payload_file, tmp_path, monkeypatch, capsys):
    from executor.stages import run as run_stage

    def fake_run(settings, job, script, stage):
        raise exc

    monkeypatch.setattr(run_stage, "run", fake_run)
    assert run(["--config", str(config_file), "run", _script(tmp_path), "build_script"]) == SYSTEM
    assert not (tmp_path / "build_exit_code").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if not isinstance(exc, KeyboardInterrupt):  # click turns that into a silent Abort
        assert "error:" in err


def test_a_successful_stage_exits_zero(config_file, payload_file, tmp_path, monkeypatch):
    from executor.stages import cleanup as cleanup_stage

    calls = []
    monkeypatch.setattr(cleanup_stage, "cleanup", lambda settings, job, config_file: calls.append(job.job_id))
    assert run(["--config", str(config_file), "cleanup"]) == 0
    assert calls == [4242]


def test_a_second_agent_for_the_same_prefix_says_who_runs_and_exits(config_file, capsys):
    from executor.adapters.hostfiles import load_settings
    from executor.agent import client

    settings = load_settings(str(config_file))
    with client.service(settings).hold():
        with pytest.raises(SystemExit) as info:
            cli.main(["--config", str(config_file), "agent"])
    assert info.value.code == SYSTEM
    err = capsys.readouterr().err
    assert f"the host agent for name prefix 'ci' is already running (pid {os.getpid()};" in err


def test_pool_status_json_says_how_many_vms_are_idle(config_file, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--config", str(config_file), "pool", "status", "--json"])
    assert info.value.code == 0
    status = json.loads(capsys.readouterr().out)
    assert status["idle"] == 0 and status["size"] == 0 and status["agent"]["running"] is False
