"""The job as gitlab-runner describes it: identity from the payload, never from CUSTOM_ENV_*.

`JOB_RESPONSE_FILE` is the job payload exactly as GitLab sent it. A job can set any variable it
likes, including `CI_JOB_ID`, and gitlab-runner keeps the last duplicate, so a
`CUSTOM_ENV_CI_JOB_ID` can point at another job's VM. The payload's top-level `id` cannot be
forged by the job. The payload also holds the job token and other secrets: only the few fields
below are kept, the rest is dropped as soon as it is parsed.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from executor.core.images import ImageSpecError, JobContainers, job_containers, public_variables
from executor.core.jobsize import VARIABLES as SIZE_VARIABLES
from executor.core.jsonvalues import object_at
from executor.errors import JobError

JOB_RESPONSE_FILE = "JOB_RESPONSE_FILE"
DEFAULT_JOB_TIMEOUT_S = 3600

_SAFE_TEXT = re.compile(r"[^A-Za-z0-9_./@:+ -]")
_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Job:
    job_id: int
    project_id: int | None
    project: str  # project path, for display only, sanitized
    pipeline_id: int | None
    runner_id: int | None
    timeout_s: int
    # The host of the repository URL GitLab sent (git_info.repo_url, set by GitLab, not by the
    # job; its credentials are dropped): the server the VM must reach for git and artifacts.
    gitlab_host: str | None = None
    # git_info.protected: the job runs for a protected branch or tag (GitLab decides; a job
    # cannot set it). What the Docker layer cache's trust rests on (core.layercache).
    protected: bool = False
    # image mode: the job's image and services (no credentials), and why they are unusable
    containers: JobContainers = field(default_factory=lambda: JobContainers(None))
    containers_error: str | None = None
    public_variables: tuple[tuple[str, str], ...] = ()
    # The VM size the job asks for: (variable, raw value) of LVX_VCPUS, LVX_MEMORY_MIB, LVX_DISK_GIB.
    size_request: tuple[tuple[str, str], ...] = ()


def _safe_text(value: Any, limit: int = 200) -> str:
    """Job-controlled text reduced to a harmless printable form for metadata and logs."""
    return _SAFE_TEXT.sub("_", str(value))[:limit] if value is not None else ""


def _positive_int(value: Any) -> int | None:
    """A positive integer of at most 18 digits (what naming.job_id_of recognises), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and 0 < len(value) <= 18:
        value = int(value)
    if isinstance(value, int) and 0 < value < 10**18:
        return value
    return None


def _first_variable(variables: Any, key: str) -> Any:
    """The first occurrence wins: GitLab lists predefined variables before user ones."""
    if not isinstance(variables, list):
        return None
    for var in variables:
        if isinstance(var, dict) and var.get("key") == key:
            return var.get("value")
    return None


def _repository_host(git_info: dict[str, Any]) -> str | None:
    url = git_info.get("repo_url")
    if not isinstance(url, str):
        return None
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError:
        return None
    return host if host and _HOST_NAME.match(host) else None


def parse_job(payload_text: str, environ: Mapping[str, str] | None = None) -> Job:
    try:
        payload = json.loads(payload_text)
    except json.JSONDecodeError as exc:
        raise JobError(f"job payload is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(payload, dict):
        raise JobError("job payload is not a JSON object")
    job_id = _positive_int(payload.get("id"))
    if job_id is None:
        raise JobError("job payload has no valid positive integer `id`")
    job_info = object_at(payload, "job_info")
    runner_info = object_at(payload, "runner_info")
    variables = payload.get("variables")
    timeout = _positive_int(runner_info.get("timeout")) or DEFAULT_JOB_TIMEOUT_S
    project = _first_variable(variables, "CI_PROJECT_PATH") or job_info.get("project_name")
    return Job(
        job_id=job_id,
        project_id=_positive_int(job_info.get("project_id")),
        project=_safe_text(project),
        pipeline_id=_positive_int(_first_variable(variables, "CI_PIPELINE_ID")),
        runner_id=_positive_int(_first_variable(variables, "CI_RUNNER_ID")),
        timeout_s=timeout,
        gitlab_host=_repository_host(object_at(payload, "git_info")),
        protected=object_at(payload, "git_info").get("protected") is True,
        public_variables=tuple(public_variables(variables)),
        size_request=_size_request(variables),
        **_containers(payload, environ or {}),
    )


def _size_request(variables: Any) -> tuple[tuple[str, str], ...]:
    found = ((key, _first_variable(variables, key)) for key in SIZE_VARIABLES)
    return tuple((key, value if isinstance(value, str) else str(value)) for key, value in found if value is not None)


def _containers(payload: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The image and services; an unusable definition is kept as its error, so that config and
    cleanup still work for the job and prepare can say what is wrong."""
    try:
        return {"containers": job_containers(payload, environ)}
    except ImageSpecError as exc:
        return {"containers": JobContainers(None), "containers_error": str(exc)}


@dataclass(frozen=True)
class RegistryCredentials:
    """The payload's registry credentials and DOCKER_AUTH_CONFIG: secrets, kept in memory for
    the pulls of prepare only and never shown (no repr)."""

    credentials: tuple[dict[str, Any], ...] = field(default=(), repr=False)
    docker_auth_config: str | None = field(default=None, repr=False)


def parse_registry_credentials(payload_text: str) -> RegistryCredentials:
    try:
        payload = json.loads(payload_text)
    except ValueError:
        return RegistryCredentials()
    if not isinstance(payload, dict):
        return RegistryCredentials()
    raw = payload.get("credentials")
    credentials = tuple(c for c in raw if isinstance(c, dict)) if isinstance(raw, list) else ()
    # DOCKER_AUTH_CONFIG is a job variable (usually masked); the last definition wins, as in GitLab.
    auth_config = None
    for var in payload.get("variables") or []:
        if isinstance(var, dict) and var.get("key") == "DOCKER_AUTH_CONFIG" and isinstance(var.get("value"), str):
            auth_config = var["value"]
    return RegistryCredentials(credentials, auth_config)


def job_response_path(environ: Mapping[str, str]) -> str:
    path = environ.get(JOB_RESPONSE_FILE)
    if not path:
        raise JobError(f"{JOB_RESPONSE_FILE} is not set: this command must be run by gitlab-runner's custom executor")
    return path
