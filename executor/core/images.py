"""Image mode, the GitLab docker executor's rules: the job's image and services as the payload
gives them, service aliases, allowed images, pull policies, registry credentials, and which
stages run in the build container.

Everything here is job-controlled input: names are validated before they reach the daemon, and
nothing is ever put into a shell command or a log beyond the image names themselves.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from executor.core.jsonvalues import object_at

PULL_POLICIES = ("always", "if-not-present", "never")
# GitLab's helper stages run where git and gitlab-runner are: bash in the VM. These run in the
# build container (common/build.go: the user script steps and after_script).
CONTAINER_STAGES = ("build_script", "after_script")
# GitLab's shell detection for the build container (shells/bash.go), the script path as $0.
DETECT_SHELL = (
    "for s in /usr/local/bin/bash /usr/bin/bash /bin/bash /usr/local/bin/sh /usr/bin/sh /bin/sh /busybox/sh; do "
    'if [ -x "$s" ]; then exec "$s" "$0"; fi; done; echo "shell not found"; exit 1'
)
DOCKER_HUB = "docker.io"
# A reference as docker accepts it: [registry[:port]/]path[:tag][@digest], lower-case path.
_REFERENCE = re.compile(
    r"^(?:(?P<registry>[A-Za-z0-9.-]+(?::[0-9]+)?)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


class ImageSpecError(ValueError):
    """The job's image or service definition is unusable (the job's fault)."""


@dataclass(frozen=True)
class Reference:
    registry: str  # "docker.io" when the name has none
    path: str  # "library/python" for Docker Hub official images
    tag: str | None
    digest: str | None
    text: str  # as the job wrote it

    @property
    def repository(self) -> str:
        """What `docker pull` is given without the tag: registry/path."""
        return f"{self.registry}/{self.path}"

    @property
    def pull_tag(self) -> str:
        return self.digest or self.tag or "latest"


def parse_reference(text: str) -> Reference:
    if not isinstance(text, str) or not text or len(text) > 512:
        raise ImageSpecError(f"invalid image name {text!r}")
    m = _REFERENCE.match(text)
    if not m:
        raise ImageSpecError(f"invalid image name {text!r}")
    registry = m.group("registry")
    path = m.group("path")
    # A first component without a dot or a port, other than localhost, is a Docker Hub path.
    if registry and "." not in registry and ":" not in registry and registry != "localhost":
        if not re.fullmatch(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", registry):
            raise ImageSpecError(f"invalid image name {text!r}")
        path, registry = f"{registry}/{path}", None
    if registry is None:
        registry = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    return Reference(registry, path, m.group("tag"), m.group("digest"), text)


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    aliases: tuple[str, ...]  # the user's, in order (derived ones are added by `service_aliases`)
    entrypoint: tuple[str, ...] | None
    command: tuple[str, ...] | None
    variables: tuple[tuple[str, str], ...] = ()
    pull_policies: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageSpec:
    name: str
    entrypoint: tuple[str, ...] | None = None
    pull_policies: tuple[str, ...] = ()
    user: str | None = None  # executor_opts.docker.user


@dataclass(frozen=True)
class JobContainers:
    image: ImageSpec | None
    services: tuple[ServiceSpec, ...] = field(default_factory=tuple)


def _strings(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageSpecError(f"{what} must be a list of strings")
    return tuple(value)


def _policies(value: Any, what: str) -> tuple[str, ...]:
    policies = _strings(value, what) or ()
    for p in policies:
        if p not in PULL_POLICIES:
            raise ImageSpecError(f"{what}: unknown pull policy {p!r} (known: {', '.join(PULL_POLICIES)})")
    return policies


def _variables(value: Any, what: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    pairs: list[tuple[str, str]] = []
    if isinstance(value, dict):  # CUSTOM_ENV_CI_JOB_SERVICES shape
        pairs = [(k, v) for k, v in value.items() if isinstance(k, str) and isinstance(v, str)]
    elif isinstance(value, list):  # payload shape
        pairs = [
            (v["key"], v["value"])
            for v in value
            if isinstance(v, dict) and isinstance(v.get("key"), str) and isinstance(v.get("value"), str)
        ]
    else:
        raise ImageSpecError(f"{what}: variables must be a list or a map")
    for key, _ in pairs:
        if not _VARIABLE.match(key):
            raise ImageSpecError(f"{what}: invalid variable name {key!r}")
    return tuple(pairs)


def _aliases(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    if not isinstance(value, str):
        raise ImageSpecError("service alias must be a string")
    aliases = tuple(a for a in re.split(r"[,\s]+", value) if a)
    for a in aliases:
        if not _ALIAS.match(a):
            raise ImageSpecError(f"invalid service alias {a!r}")
    return aliases


def _service(raw: Any, index: int) -> ServiceSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ImageSpecError(f"service #{index + 1} has no name")
    name = raw["name"]
    parse_reference(name)
    return ServiceSpec(
        name=name,
        aliases=_aliases(raw.get("alias")),
        entrypoint=_strings(raw.get("entrypoint"), f"service {name}: entrypoint"),
        command=_strings(raw.get("command"), f"service {name}: command"),
        variables=_variables(raw.get("variables"), f"service {name}"),
        pull_policies=_policies(raw.get("pull_policy"), f"service {name}: pull_policy"),
    )


def job_containers(payload: Mapping[str, Any], environ: Mapping[str, str]) -> JobContainers:
    """The job's image and services: from the payload, else from CUSTOM_ENV_CI_JOB_IMAGE and
    CUSTOM_ENV_CI_JOB_SERVICES (which the job could override, so the payload wins)."""
    image = _image(payload.get("image"), environ.get("CUSTOM_ENV_CI_JOB_IMAGE", ""))
    raw_services = payload.get("services")
    if not raw_services:
        text = environ.get("CUSTOM_ENV_CI_JOB_SERVICES", "")
        try:
            raw_services = json.loads(text) if text else []
        except ValueError:
            raise ImageSpecError("CUSTOM_ENV_CI_JOB_SERVICES is not JSON") from None
    if not isinstance(raw_services, list):
        raise ImageSpecError("services must be a list")
    return JobContainers(image, tuple(_service(s, i) for i, s in enumerate(raw_services)))


def _image(raw: Any, from_env: str) -> ImageSpec | None:
    if isinstance(raw, dict) and raw.get("name"):
        name = raw["name"]
        user = object_at(object_at(raw, "executor_opts"), "docker").get("user")
        if user is not None and (not isinstance(user, str) or not re.match(r"^[A-Za-z0-9_.:-]{1,64}$", user)):
            raise ImageSpecError(f"invalid executor_opts.docker.user {user!r}")
        parse_reference(name)
        return ImageSpec(
            name=name,
            entrypoint=_strings(raw.get("entrypoint"), "image entrypoint"),
            pull_policies=_policies(raw.get("pull_policy"), "image pull_policy"),
            user=user or None,
        )
    if from_env:
        parse_reference(from_env)
        return ImageSpec(from_env)
    return None


# --- aliases (helpers/container/services/services.go) ---------------------------------------


def derived_aliases(name: str) -> tuple[str, ...]:
    """GitLab's aliases of a service image: the path without tag, digest and registry port,
    with "/" as "__", and with "/" as "-" when that differs."""
    without_digest = name.split("@", 1)[0]
    last_slash = without_digest.rfind("/")
    colon = without_digest.rfind(":")
    if colon > last_slash:
        without_digest = without_digest[:colon]
    parts = without_digest.split("/")
    parts[0] = parts[0].split(":", 1)[0]  # a registry port
    path = "/".join(parts)
    first = path.replace("/", "__")
    second = path.replace("/", "-")
    return (first,) if first == second else (first, second)


def service_aliases(services: Sequence[ServiceSpec]) -> tuple[list[tuple[str, ...]], list[str]]:
    """Each service's network aliases (derived, then the user's) and a warning per alias that an
    earlier service already took (GitLab skips those)."""
    taken: set[str] = set()
    result, warnings = [], []
    for service in services:
        mine = []
        for alias in (*derived_aliases(service.name), *service.aliases):
            if alias in mine:
                continue
            if alias in taken:
                warnings.append(
                    f"alias {alias!r} of service {service.name} is already used by another service, skipped"
                )
                continue
            taken.add(alias)
            mine.append(alias)
        result.append(tuple(mine))
    return result, warnings


# --- policy ------------------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A doublestar glob as GitLab uses them: `**` any characters, `*` and `?` within one path
    segment."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("^" + "".join(out) + "$")


def allowed(name: str, patterns: Iterable[str]) -> bool:
    """Whether `name` matches one of `patterns`; no patterns means every image is allowed."""
    patterns = list(patterns)
    return not patterns or any(_glob_regex(p).match(name) for p in patterns)


def pull_policies(job: Sequence[str], configured: Sequence[str], allowed_policies: Sequence[str]) -> tuple[str, ...]:
    """The pull policies to try in order: the job's if it set any and they are all allowed,
    else the configured ones. ImageSpecError (GitLab's message) for a job policy not allowed."""
    allowed_set = tuple(allowed_policies) or tuple(configured)
    if job:
        refused = [p for p in job if p not in allowed_set]
        if refused:
            raise ImageSpecError(
                f"pull_policy ({', '.join(job)}) defined in GitLab pipeline config is not one of the "
                f"allowed_pull_policies ({', '.join(allowed_set)})"
            )
        return tuple(job)
    return tuple(configured)


# --- registry credentials ----------------------------------------------------------------------


def _registry_key(text: str) -> str:
    host = re.sub(r"^https?://", "", text).split("/", 1)[0].lower()
    return DOCKER_HUB if host in ("index.docker.io", "registry-1.docker.io", "docker.io") else host


def registry_auth(reference: Reference, credentials: Any, docker_auth_config: str | None) -> dict[str, str] | None:
    """{username, password} for the image's registry: DOCKER_AUTH_CONFIG first (as GitLab), then
    the payload's `credentials` of type registry. None: pull anonymously."""
    wanted = _registry_key(reference.registry)
    if docker_auth_config:
        try:
            auths = json.loads(docker_auth_config).get("auths", {})
        except (ValueError, AttributeError):
            auths = {}
        if isinstance(auths, dict):
            for registry, entry in auths.items():
                if _registry_key(str(registry)) == wanted and isinstance(entry, dict):
                    found = _auth_entry(entry)
                    if found:
                        return found
    if isinstance(credentials, list):
        for cred in credentials:
            if (
                isinstance(cred, dict)
                and cred.get("type") == "registry"
                and _registry_key(str(cred.get("url", ""))) == wanted
                and isinstance(cred.get("username"), str)
                and isinstance(cred.get("password"), str)
            ):
                return {"username": cred["username"], "password": cred["password"]}
    return None


def _auth_entry(entry: Mapping[str, Any]) -> dict[str, str] | None:
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return {"username": entry["username"], "password": entry["password"]}
    auth = entry.get("auth")
    if isinstance(auth, str):
        try:
            user, _, password = base64.b64decode(auth, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if user:
            return {"username": user, "password": password}
    return None


# --- stages and variables --------------------------------------------------------------------


def runs_in_container(stage: str) -> bool:
    """build_script, every step_* and after_script run in the build container; the helper stages
    (get_sources, caches, artifacts, cleanup_file_variables, unknown ones) in the VM."""
    return stage in CONTAINER_STAGES or stage.startswith("step_")


def public_variables(variables: Any) -> list[tuple[str, str]]:
    """The payload's variables that are neither secret (public: false) nor file variables, the
    last occurrence of a key winning (the more specific level): what services get, as in GitLab."""
    seen: dict[str, str] = {}
    if isinstance(variables, list):
        for var in variables:
            if not isinstance(var, dict) or var.get("public") is not True or var.get("file"):
                continue
            key, value = var.get("key"), var.get("value")
            if isinstance(key, str) and isinstance(value, str) and _VARIABLE.match(key):
                seen[key] = value
    return list(seen.items())
