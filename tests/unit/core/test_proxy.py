"""executor.core.proxy: the forwarder's config and what job VMs are told, for corporate proxies."""

from __future__ import annotations

import dataclasses

import pytest

from executor.core import proxy
from executor.core.settings import NetworkSettings, Settings, parse_settings
from executor.errors import ConfigError


def settings(**network) -> Settings:
    return dataclasses.replace(Settings(), network=NetworkSettings(proxy="http://proxy.corp:8080", **network))


def test_the_forwarder_serves_the_vm_network_on_its_host_address_and_adds_the_credentials():
    text = proxy.forwarder_config(settings(), ("bot", "s3cret"))
    lines = text.splitlines()
    assert "http_port 192.168.213.1:3128" in lines
    assert lines.index("acl job_vms src 192.168.213.0/24") < lines.index("http_access allow job_vms")
    assert lines.index("http_access allow job_vms") < lines.index("http_access deny all")
    assert "cache_peer proxy.corp parent 8080 0 no-query no-digest default login=bot:s3cret" in lines
    assert "never_direct allow all" in lines and "cache deny all" in lines  # always through the company's
    assert "via off" in lines and "forwarded_for delete" in lines and "cache_effective_user proxy" in lines
    assert text.count("s3cret") == 1
    unauthenticated = proxy.forwarder_config(settings(), None).splitlines()
    assert "cache_peer proxy.corp parent 8080 0 no-query no-digest default" in unauthenticated


def test_vms_get_the_password_less_forwarder_and_reach_their_network_the_host_and_gitlab_directly():
    s = settings(no_proxy=(".corp.example.com", "10.1.0.0/16"))
    env = proxy.environment(s, "gitlab.corp.example.com")
    assert env["HTTP_PROXY"] == env["https_proxy"] == "http://192.168.213.1:3128"
    assert (
        env["NO_PROXY"]
        == env["no_proxy"]
        == ("localhost,127.0.0.1,192.168.213.0/24,192.168.213.1,gitlab.corp.example.com,.corp.example.com,10.1.0.0/16")
    )
    assert set(env) == {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"}
    assert proxy.daemon_proxies(s) == {
        "http-proxy": "http://192.168.213.1:3128",
        "https-proxy": "http://192.168.213.1:3128",
        "no-proxy": "localhost,127.0.0.1,192.168.213.0/24,192.168.213.1,.corp.example.com,10.1.0.0/16",
    }
    assert proxy.host_ports(s) == (3128,) and proxy.host_ports(Settings()) == ()


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("bot:s3cret\n", ("bot", "s3cret")),
        ("bot:pa:ss\n", ("bot", "pa:ss")),
        ("bot\n", None),
        ("bot:\n", None),
        ("bot:pass word\n", None),
        ("bot:p@ss\n", None),
        ("bot:p%41ss\n", None),
        ("a:b\nc:d\n", None),
    ],
)
def test_credentials_are_one_line_the_forwarders_syntax_can_carry(text, ok):
    if ok:
        assert proxy.parse_credentials(text, "f") == ok
    else:
        with pytest.raises(ConfigError) as info:
            proxy.parse_credentials(text, "f")
        assert "s3cret" not in str(info.value) and "pass word" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("https://proxy:8080", "is not a proxy URL"),
        ("http://proxy", "is not a proxy URL"),
        ("http://proxy:8080/path", "is not a proxy URL"),
        ("http://bot:pw@proxy:8080", "without credentials"),
    ],
)
def test_a_proxy_url_is_http_host_and_port_without_credentials(value, problem):
    with pytest.raises(ConfigError, match=problem) as info:
        parse_settings(f'[network]\nproxy = "{value}"\n')
    assert "pw" not in str(info.value).replace("network.proxy_credentials_file", "")
    assert parse_settings('[network]\nproxy = "http://proxy.corp:8080"\n').network.proxy == "http://proxy.corp:8080"
