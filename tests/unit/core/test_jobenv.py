"""executor.core.jobenv: job identity from the payload, never from job-controlled variables."""

from __future__ import annotations

import dataclasses
import json

import pytest

from executor.core.jobenv import (
    DEFAULT_JOB_TIMEOUT_S,
    JOB_RESPONSE_FILE,
    Job,
    RegistryCredentials,
    job_response_path,
    parse_job,
    parse_registry_credentials,
)
from executor.errors import JobError

SECRET_TOKEN = "glcbt-64_SeCrEtJobTokenValue"
SECRET_VAR = "s3cr3t-registry-password"


def payload(**overrides) -> dict:
    data = {
        "id": 4242,
        "token": SECRET_TOKEN,
        "job_info": {"name": "test", "project_id": 17, "project_name": "project"},
        "runner_info": {"timeout": 600},
        "variables": [
            {"key": "CI_JOB_ID", "value": "4242", "public": True},
            {"key": "CI_JOB_TOKEN", "value": SECRET_TOKEN, "public": False, "masked": True},
            {"key": "CI_PIPELINE_ID", "value": "900", "public": True},
            {"key": "CI_RUNNER_ID", "value": "3", "public": True},
            {"key": "CI_PROJECT_PATH", "value": "group/project", "public": True},
            {"key": "REGISTRY_PASSWORD", "value": SECRET_VAR, "public": False, "masked": True},
        ],
    }
    data.update(overrides)
    return data


def parse(**overrides) -> Job:
    return parse_job(json.dumps(payload(**overrides)))


def test_fields_come_from_the_payload():
    job = parse()
    public = (
        ("CI_JOB_ID", "4242"),
        ("CI_PIPELINE_ID", "900"),
        ("CI_RUNNER_ID", "3"),
        ("CI_PROJECT_PATH", "group/project"),
    )
    assert job == Job(
        job_id=4242,
        project_id=17,
        project="group/project",
        pipeline_id=900,
        runner_id=3,
        timeout_s=600,
        public_variables=public,
    )


def test_job_id_comes_from_payload_id_not_from_variables():
    variables = [{"key": "CI_JOB_ID", "value": "1"}, {"key": "CI_JOB_ID", "value": "2"}]
    assert parse(id=777, variables=variables).job_id == 777


def test_job_id_as_a_digit_string_is_accepted():
    assert parse(id="123").job_id == 123


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[1, 2]",
        '"4242"',
        "null",
        json.dumps({"token": "x"}),  # no id
        json.dumps({"id": None}),
        json.dumps({"id": 0}),
        json.dumps({"id": -5}),
        json.dumps({"id": True}),
        json.dumps({"id": 1.5}),
        json.dumps({"id": "abc"}),
        json.dumps({"id": "12a"}),
        json.dumps({"id": " 12"}),
        json.dumps({"id": "0"}),
        json.dumps({"id": "000"}),
        json.dumps({"id": "-3"}),
        json.dumps({"id": "²"}),  # str.isdigit() is True, int() refuses it
        json.dumps({"id": "١٢"}),  # Arabic-Indic digits: not an id either
        json.dumps({"id": 10**18}),  # 19 digits: naming.job_id_of would not recognise the VM
        json.dumps({"id": "1" * 19}),
        json.dumps({"id": [1]}),
    ],
)
def test_bad_payload_or_id_is_a_job_error(text):
    with pytest.raises(JobError):
        parse_job(text)


def test_largest_accepted_id_is_recognised_by_naming():
    from executor.core import naming

    job = parse(id=10**18 - 1)
    assert naming.job_id_of("lvx", naming.vm_name("lvx", job.job_id)) == job.job_id


def test_first_occurrence_of_a_variable_wins():
    variables = payload()["variables"] + [
        {"key": "CI_PIPELINE_ID", "value": "1"},  # user-defined duplicate, later in the list
        {"key": "CI_RUNNER_ID", "value": "99"},
        {"key": "CI_PROJECT_PATH", "value": "evil/other"},
    ]
    job = parse(variables=variables)
    assert (job.pipeline_id, job.runner_id, job.project) == (900, 3, "group/project")


def test_malformed_variables_are_ignored():
    variables = ["junk", 5, None, {"value": "no key"}, {"key": "CI_PIPELINE_ID", "value": "x9"}]
    job = parse(variables=variables)
    assert job.pipeline_id is None and job.runner_id is None
    assert parse(variables={"CI_PIPELINE_ID": "5"}).pipeline_id is None


@pytest.mark.parametrize(
    "hostile",
    [
        "</lvx:project><x/>",
        "a\"b'c",
        "line1\nline2\r\x00\x1b[31m",
        "grp/proj & <script>alert(1)</script>",
        "${HOME}`id`$(id);|",
    ],
)
def test_project_text_is_sanitised(hostile):
    variables = [{"key": "CI_PROJECT_PATH", "value": hostile}]
    project = parse(variables=variables).project
    assert len(project) == len(hostile)  # replaced, not dropped
    for bad in "<>\"'&\n\r\x00\x1b`$;|()":
        assert bad not in project


def test_project_keeps_ordinary_paths_and_is_bounded():
    assert parse(variables=[{"key": "CI_PROJECT_PATH", "value": "my-group/sub.group/proj_1"}]).project == (
        "my-group/sub.group/proj_1"
    )
    assert len(parse(variables=[{"key": "CI_PROJECT_PATH", "value": "a" * 5000}]).project) == 200


def test_project_falls_back_to_project_name_then_empty():
    assert parse(variables=[]).project == "project"
    assert parse(variables=[], job_info={}).project == ""
    assert parse(variables=[], job_info="not a dict").project == ""


@pytest.mark.parametrize("runner_info", [None, {}, {"timeout": 0}, {"timeout": "soon"}, {"timeout": -1}, "x"])
def test_timeout_defaults_when_missing_or_invalid(runner_info):
    data = payload()
    if runner_info is None:
        del data["runner_info"]
    else:
        data["runner_info"] = runner_info
    assert parse_job(json.dumps(data)).timeout_s == DEFAULT_JOB_TIMEOUT_S == 3600


def test_timeout_from_runner_info():
    assert parse(runner_info={"timeout": 7200}).timeout_s == 7200


def test_job_token_and_secret_variables_are_not_kept():
    job = parse()
    assert {f.name for f in dataclasses.fields(job)} == {
        "job_id",
        "project_id",
        "protected",
        "project",
        "pipeline_id",
        "runner_id",
        "timeout_s",
        "gitlab_host",
        "containers",
        "containers_error",
        "public_variables",  # public: true only; the secret ones are in no field
        "size_request",  # LVX_VCPUS, LVX_MEMORY_MIB and LVX_DISK_GIB only
    }
    assert set(vars(job)) == {f.name for f in dataclasses.fields(job)}  # no extra attributes
    text = repr(job) + repr(dataclasses.astuple(job))
    assert SECRET_TOKEN not in text and SECRET_VAR not in text
    assert "SeCrEt" not in text


def test_job_response_path():
    assert job_response_path({JOB_RESPONSE_FILE: "/tmp/x/response.json"}) == "/tmp/x/response.json"
    for env in ({}, {JOB_RESPONSE_FILE: ""}):
        with pytest.raises(JobError, match=JOB_RESPONSE_FILE):
            job_response_path(env)


@pytest.mark.parametrize(
    ("repo_url", "host"),
    [
        ("https://gitlab-ci-token:glcbt-SECRET@gitlab.example.com/group/project.git", "gitlab.example.com"),
        ("http://10.1.2.3:8080/group/project.git", "10.1.2.3"),
        ("https://GitLab.Example.com/x.git", "gitlab.example.com"),
        ("https://bad host;rm/x.git", None),
        ("not a url", None),
        (17, None),
    ],
)
def test_gitlab_host_is_the_repository_url_host_without_its_credentials(repo_url, host):
    job = parse(git_info={"repo_url": repo_url})
    assert job.gitlab_host == host
    assert "SECRET" not in repr(job)


def test_registry_credentials_are_read_but_never_shown():
    text = json.dumps(
        payload(
            credentials=[{"type": "registry", "url": "registry.example", "username": "u", "password": SECRET_VAR}],
            variables=[{"key": "DOCKER_AUTH_CONFIG", "value": '{"auths": {}}', "public": False}],
        )
    )
    creds = parse_registry_credentials(text)
    assert creds.credentials[0]["password"] == SECRET_VAR and creds.docker_auth_config == '{"auths": {}}'
    assert SECRET_VAR not in repr(creds) and "auths" not in repr(creds)
    assert parse_registry_credentials("not json") == RegistryCredentials()


def test_an_unusable_image_definition_is_kept_as_its_error_not_raised():
    job = parse(image={"name": "UPPER/Case:bad tag"})
    assert job.containers.image is None and "invalid image name" in (job.containers_error or "")


def test_image_and_services_come_from_the_payload_before_the_environment():
    env = {
        "CUSTOM_ENV_CI_JOB_IMAGE": "alpine:3",
        "CUSTOM_ENV_CI_JOB_SERVICES": '[{"name": "redis:7", "alias": "", "entrypoint": null, "command": null}]',
    }
    job = parse_job(
        json.dumps(payload(image={"name": "python:3.12"}, services=[{"name": "postgres:16", "alias": "db"}])), env
    )
    assert job.containers.image.name == "python:3.12"
    assert [(s.name, s.aliases) for s in job.containers.services] == [("postgres:16", ("db",))]
    from_env = parse_job(json.dumps(payload()), env)
    assert from_env.containers.image.name == "alpine:3"
    assert [s.name for s in from_env.containers.services] == ["redis:7"]


@pytest.mark.parametrize(
    ("git_info", "protected"),
    [({"protected": True}, True), ({"protected": False}, False), ({"protected": "true"}, False), ({}, False)],
)
def test_protected_only_when_the_payload_says_true(git_info, protected):
    data = payload()
    data["git_info"] = git_info
    data["variables"].append(
        {"key": "CI_COMMIT_REF_PROTECTED", "value": "true"}
    )  # a job's own claim counts for nothing
    assert parse_job(json.dumps(data)).protected is protected
