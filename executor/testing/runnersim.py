"""Drive the executor exactly the way gitlab-runner's custom executor does, without GitLab.

Used by the demo job, the vm tests and the benchmarks. It reproduces what the executor can see
of gitlab-runner (see shared/reference/custom-executor-protocol.md beside the repository): a temp dir as cwd and TMPDIR, a
0600 `response.json` job payload (`JOB_RESPONSE_FILE`), `BUILD_FAILURE_EXIT_CODE=1`,
`SYSTEM_FAILURE_EXIT_CODE=2`, `BUILD_EXIT_CODE_FILE` (never created or cleared by the runner),
`CUSTOM_ENV_*` job variables, stdin /dev/null, a fresh 0700 script file per stage in the
runner's bash shape passed as the last-but-one argument, every stage in its own process group,
and the kill sequence SIGTERM to the group, a grace period, then SIGKILL to the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LIBVIRT_DEFAULT_URI")


def ansi_c_quote(text: str) -> str:
    """Bash $'...' quoting, as gitlab-runner's helpers/shell_escape.go produces."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("\\'")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def runner_script(body: str, variables: dict[str, str] | None = None) -> str:
    """A stage script in the shape gitlab-runner >= 19.1 writes for bash (shells/bash.go)."""
    exports = "".join(f"export {k}={ansi_c_quote(v)}\n" for k, v in (variables or {}).items())
    return (
        "#!/usr/bin/env bash\n"
        "trap 'exit 1' TERM\n"
        'case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit\n'
        "set +o noclobber\n"
        f"(trap 'exit 1' TERM; eval {ansi_c_quote(exports + body)}) < /dev/null\n"
        "exit 0\n"
    )


@dataclass(frozen=True)
class StageResult:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str
    seconds: float
    build_exit_code: str | None  # content of BUILD_EXIT_CODE_FILE after the stage, if any

    def describe(self) -> str:
        return (
            f"{' '.join(self.argv)} -> rc={self.rc} in {self.seconds:.1f}s\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"
        )


class RunnerSim:
    """One job as gitlab-runner would run it through `libvirt-executor`."""

    def __init__(
        self,
        config_path: str | Path,
        workdir: str | Path,
        job_id: int,
        timeout_s: int = 600,
        variables: dict[str, str] | None = None,
        executable: list[str] | None = None,
        payload_extra: dict[str, object] | None = None,
        secret_variables: dict[str, str] | None = None,
        merged_output: bool = False,
    ) -> None:
        """`merged_output`: a stage's stderr goes into its stdout as it comes, the order the
        job log has in gitlab-runner (which reads both into it); `stderr` stays empty."""
        self.config_path = str(config_path)
        self.merged_output = merged_output
        self.tmp = Path(workdir)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.job_id = job_id
        self.variables = {
            "CI_JOB_ID": str(job_id),
            "CI_PROJECT_PATH": "demo/project",
            "CI_PIPELINE_ID": "1",
            "CI_JOB_TOKEN": "glcbt-" + secrets.token_hex(10),  # a secret: must never leak
            **(variables or {}),
        }
        self.executable = executable or [sys.executable, "-m", "executor"]
        self.response_file = self.tmp / "response.json"
        self.build_exit_code_file = self.tmp / "build_exit_code"
        payload = {
            "id": job_id,
            "token": self.variables["CI_JOB_TOKEN"],
            "job_info": {"id": job_id, "name": "demo", "stage": "test", "project_id": 1, "project_name": "project"},
            "runner_info": {"timeout": timeout_s},
            "variables": [
                {"key": k, "value": v, "public": k != "CI_JOB_TOKEN", "masked": k == "CI_JOB_TOKEN"}
                for k, v in self.variables.items()
            ]
            + [{"key": k, "value": v, "public": False, "masked": True} for k, v in (secret_variables or {}).items()],
            **(payload_extra or {}),
        }
        fd = os.open(self.response_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)

    def env(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        env.update(
            {
                "TMPDIR": str(self.tmp),
                "BUILD_FAILURE_EXIT_CODE": "1",
                "SYSTEM_FAILURE_EXIT_CODE": "2",
                "BUILD_EXIT_CODE_FILE": str(self.build_exit_code_file),
                "JOB_RESPONSE_FILE": str(self.response_file),
                "LIBVIRT_EXECUTOR_CONFIG": self.config_path,
            }
        )
        env.update({f"CUSTOM_ENV_{k}": v for k, v in self.variables.items()})
        return env

    def write_script(self, body: str) -> Path:
        d = self.tmp / f"script{secrets.randbelow(10**9)}"
        d.mkdir(mode=0o700)
        path = d / "script"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(runner_script(body, self.variables))
        return path

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*self.executable, *args],
            cwd=self.tmp,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if self.merged_output else subprocess.PIPE,
            start_new_session=True,  # gitlab-runner: Setpgid per executable
        )

    def finish(self, proc: subprocess.Popen[bytes], started: float, timeout: float | None = None) -> StageResult:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc, signal.SIGKILL)
            out, err = proc.communicate()
        code = self.build_exit_code_file.read_text() if self.build_exit_code_file.exists() else None
        return StageResult(
            tuple(str(a) for a in proc.args) if isinstance(proc.args, list) else (str(proc.args),),
            proc.returncode,
            out.decode("utf-8", "replace"),
            (err or b"").decode("utf-8", "replace"),
            time.monotonic() - started,
            code,
        )

    def call(self, *args: str, timeout: float | None = None) -> StageResult:
        started = time.monotonic()
        return self.finish(self.start(*args), started, timeout)

    def config(self) -> StageResult:
        return self.call("config", timeout=60)

    def prepare(self, timeout: float = 900) -> StageResult:
        return self.call("prepare", timeout=timeout)

    def run(self, body: str, stage: str = "build_script", timeout: float = 900) -> StageResult:
        return self.call("run", str(self.write_script(body)), stage, timeout=timeout)

    def start_run(self, body: str, stage: str = "build_script") -> subprocess.Popen[bytes]:
        return self.start("run", str(self.write_script(body)), stage)

    def cleanup(self, timeout: float = 300) -> StageResult:
        return self.call("cleanup", timeout=timeout)


def kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def terminate_like_runner(proc: subprocess.Popen[bytes], graceful: float = 600, force: float = 10) -> str:
    """SIGTERM to the group, wait `graceful`, SIGKILL to the group, wait `force` (killer.go)."""
    kill_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=graceful)
        return "terminated"
    except subprocess.TimeoutExpired:
        kill_group(proc, signal.SIGKILL)
        proc.wait(timeout=force)
        return "killed"
