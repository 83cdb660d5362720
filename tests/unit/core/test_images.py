"""executor.core.images: GitLab's docker-executor rules, checked against the reference's table."""

from __future__ import annotations

import base64
import json

import pytest

from executor.core import images
from executor.core.images import ImageSpecError, ServiceSpec


@pytest.mark.parametrize(
    ("name", "aliases"),
    [
        ("postgres:15", ("postgres",)),
        ("docker:dind", ("docker",)),
        (
            "registry.example.com/group/tutum/wordpress:latest",
            ("registry.example.com__group__tutum__wordpress", "registry.example.com-group-tutum-wordpress"),
        ),
        ("domain.tld:8080/ns/svc", ("domain.tld__ns__svc", "domain.tld-ns-svc")),
        ("mysql@sha256:" + "a" * 64, ("mysql",)),
        ("tutum/wordpress", ("tutum__wordpress", "tutum-wordpress")),
    ],
)
def test_derived_aliases_follow_gitlab(name, aliases):
    assert images.derived_aliases(name) == aliases


def service(name: str, *aliases: str) -> ServiceSpec:
    return ServiceSpec(name=name, aliases=aliases, entrypoint=None, command=None)


def test_user_aliases_are_added_and_taken_ones_skipped_with_a_warning():
    result, warnings = images.service_aliases([service("postgres:16", "db", "pg"), service("mysql:8", "db")])
    assert result == [("postgres", "db", "pg"), ("mysql",)]
    assert warnings == ["alias 'db' of service mysql:8 is already used by another service, skipped"]


@pytest.mark.parametrize(
    ("text", "registry", "path", "tag"),
    [
        ("python:3.12", "docker.io", "library/python", "3.12"),
        ("busybox", "docker.io", "library/busybox", None),
        ("group/app:1", "docker.io", "group/app", "1"),
        ("192.168.213.1:5001/lvx/busybox:test", "192.168.213.1:5001", "lvx/busybox", "test"),
        ("localhost/x", "localhost", "x", None),
        ("registry.gitlab.com/g/p/img:v1", "registry.gitlab.com", "g/p/img", "v1"),
    ],
)
def test_references(text, registry, path, tag):
    ref = images.parse_reference(text)
    assert (ref.registry, ref.path, ref.tag) == (registry, path, tag)


@pytest.mark.parametrize("text", ["", "UPPER/case", "a b", "img:tag;rm -rf /", "x:" + "t" * 200, "$(id)", "-rm"])
def test_bad_references_are_refused(text):
    with pytest.raises(ImageSpecError):
        images.parse_reference(text)


def test_allowed_images_use_doublestar_globs():
    assert images.allowed("anything:1", [])
    assert images.allowed("python:3.12", ["python:*"])
    assert not images.allowed("evil/python:3.12", ["python:*"])
    assert images.allowed("registry.example/group/sub/img:1", ["registry.example/**"])
    assert not images.allowed("registry.example/group/img:1", ["registry.example/*:1"])
    assert images.allowed("registry.example/img:1", ["registry.example/*:1"])


def test_pull_policies_job_within_allowed_else_configured():
    assert images.pull_policies([], ["always"], []) == ("always",)
    assert images.pull_policies(["if-not-present"], ["always"], ["always", "if-not-present"]) == ("if-not-present",)
    with pytest.raises(
        ImageSpecError,
        match=r"pull_policy \(never\) defined in GitLab pipeline config is not one of the allowed_pull_policies \(always\)",
    ):
        images.pull_policies(["never"], ["always"], [])


def test_registry_auth_prefers_docker_auth_config_then_payload_credentials():
    ref = images.parse_reference("registry.example.com:5000/g/img:1")
    auth = base64.b64encode(b"alice:from-auth-config").decode()
    config = json.dumps({"auths": {"registry.example.com:5000": {"auth": auth}}})
    creds = [
        {"type": "registry", "url": "https://registry.example.com:5000", "username": "ci", "password": "from-payload"}
    ]
    assert images.registry_auth(ref, creds, config) == {"username": "alice", "password": "from-auth-config"}
    assert images.registry_auth(ref, creds, None) == {"username": "ci", "password": "from-payload"}
    assert images.registry_auth(images.parse_reference("other.example/img"), creds, config) is None
    hub = images.parse_reference("library/alpine")
    hub_config = json.dumps({"auths": {"https://index.docker.io/v1/": {"username": "u", "password": "p"}}})
    assert images.registry_auth(hub, [], hub_config) == {"username": "u", "password": "p"}
    assert images.registry_auth(ref, [], "not json") is None


def test_stage_routing():
    for stage in ("build_script", "after_script", "step_release"):
        assert images.runs_in_container(stage)
    for stage in (
        "prepare_script",
        "get_sources",
        "restore_cache",
        "archive_cache",
        "upload_artifacts_on_success",
        "cleanup_file_variables",
        "some_future_stage",
    ):
        assert not images.runs_in_container(stage)


def test_public_variables_exclude_secret_and_file_variables_and_the_last_one_wins():
    variables = [
        {"key": "A", "value": "1", "public": True},
        {"key": "TOKEN", "value": "s3cret", "public": False, "masked": True},
        {"key": "KUBECONFIG", "value": "...", "public": True, "file": True},
        {"key": "A", "value": "2", "public": True},
        {"key": "bad key", "value": "x", "public": True},
    ]
    assert images.public_variables(variables) == [("A", "2")]


def test_services_in_both_shapes():
    payload = {
        "image": {
            "name": "python:3.12",
            "entrypoint": [""],
            "pull_policy": ["if-not-present"],
            "executor_opts": {"docker": {"user": "1000"}},
        },
        "services": [
            {
                "name": "postgres:16",
                "alias": "db, pg",
                "command": ["postgres", "-c", "fsync=off"],
                "variables": [{"key": "POSTGRES_PASSWORD", "value": "x"}],
            }
        ],
    }
    jc = images.job_containers(payload, {})
    assert jc.image == images.ImageSpec("python:3.12", ("",), ("if-not-present",), "1000")
    assert jc.services[0] == ServiceSpec(
        "postgres:16", ("db", "pg"), None, ("postgres", "-c", "fsync=off"), (("POSTGRES_PASSWORD", "x"),)
    )
    env = {
        "CUSTOM_ENV_CI_JOB_SERVICES": json.dumps(
            [{"name": "redis:7", "alias": "cache", "entrypoint": None, "command": None, "variables": {"A": "1"}}]
        )
    }
    from_env = images.job_containers({}, env)
    assert from_env.image is None
    assert from_env.services == (ServiceSpec("redis:7", ("cache",), None, None, (("A", "1"),)),)


@pytest.mark.parametrize(
    "payload",
    [
        {"image": {"name": "python", "executor_opts": {"docker": {"user": "root; rm"}}}},
        {"services": [{"alias": "x"}]},
        {"services": [{"name": "redis", "alias": "bad alias!"}]},
        {"services": [{"name": "redis", "variables": [{"key": "1X", "value": "v"}]}]},
        {"image": {"name": "python", "pull_policy": ["sometimes"]}},
        {"services": "redis"},
    ],
)
def test_unusable_definitions_are_refused(payload):
    with pytest.raises(ImageSpecError):
        images.job_containers(payload, {})
