"""Corporate networks: job VMs reach the web through the company's HTTP proxy, and its password
never reaches them.

The host runs a forwarder (Debian's squid, with the company's proxy as its only parent) on its
VM-network address only, open to the VM network only, that passes every request (plain HTTP,
and CONNECT for HTTPS) on to `[network] proxy` with the credentials from
`proxy_credentials_file`. (tinyproxy, tried first, keeps only the first of repeated request
headers: dockerd's several `Accept` headers lost, a registry refuses OCI manifests.) VMs get the forwarder's
password-less address: dockerd in its daemon.json, every stage in its environment (HTTP_PROXY,
HTTPS_PROXY, NO_PROXY and the lower-case spellings, which the job's own variables override).
This module is the pure part: the forwarder's config, and what VMs are told.
"""

from __future__ import annotations

import urllib.parse

from executor.core.settings import Settings
from executor.errors import ConfigError

FORWARDER_USER = "proxy"  # the unprivileged user squid runs as on Debian


def enabled(settings: Settings) -> bool:
    return bool(settings.network.proxy)


def forwarder_url(settings: Settings) -> str:
    return f"http://{settings.gateway}:{settings.network.proxy_port}"


def host_ports(settings: Settings) -> tuple[int, ...]:
    """The host port job VMs need open for the forwarder (the network policy adds it)."""
    return (settings.network.proxy_port,) if enabled(settings) else ()


def parse_credentials(text: str, source: str) -> tuple[str, str]:
    """`user:password` from the credentials file (one line). squid's `login=` option cannot
    carry whitespace, and unescapes '%'; no quotes or '@' either, to stay on the safe side."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1 or ":" not in lines[0]:
        raise ConfigError(f"{source}: must hold one line user:password")
    user, password = lines[0].strip().split(":", 1)
    if not user or not password or any(c.isspace() or c in "@%\"'" for c in user + password):
        raise ConfigError(
            f"{source}: the user and the password must be non-empty, without spaces, '@', '%' or quotes "
            "(a limit of the forwarder's config syntax)"
        )
    return user, password


def forwarder_config(settings: Settings, credentials: tuple[str, str] | None) -> str:
    """squid's config: listen on the host's VM-network address, serve the VM network only, send
    everything (CONNECT too) to the company's proxy with its credentials, cache nothing, add no
    Via or X-Forwarded-For. The one secret in it is the password: the file is root's alone
    (squid reads it as root, then runs as its own user)."""
    upstream = urllib.parse.urlsplit(settings.network.proxy)
    login = f" login={credentials[0]}:{credentials[1]}" if credentials else ""
    return (
        "# written by libvirt-executor (network.proxy); do not edit\n"
        f"http_port {settings.gateway}:{settings.network.proxy_port}\n"
        f"acl job_vms src {settings.subnet}\n"
        "http_access allow job_vms\n"
        "http_access deny all\n"
        f"cache_peer {upstream.hostname} parent {upstream.port} 0 no-query no-digest default{login}\n"
        "never_direct allow all\n"
        "cache deny all\n"
        "via off\n"
        "forwarded_for delete\n"
        "pinger_enable off\n"
        "shutdown_lifetime 1 seconds\n"
        f"cache_effective_user {FORWARDER_USER}\n"
        # The agent keeps the process (no pid file); `squid -N -d 1` logs to stderr, its log.
        "pid_filename none\n"
        "cache_log /dev/null\n"
        "access_log none\n"
        "coredump_dir /tmp\n"
        "visible_hostname libvirt-executor-forwarder\n"
    )


def no_proxy(settings: Settings, gitlab_host: str | None) -> list[str]:
    """What VMs reach directly: themselves, the host on the VM network (mirror, caches), the
    job's GitLab server (the network policy lets them reach it), and the operator's list."""
    entries = ["localhost", "127.0.0.1", str(settings.subnet), str(settings.gateway)]
    if gitlab_host:
        entries.append(gitlab_host)
    return list(dict.fromkeys([*entries, *settings.network.no_proxy]))  # first occurrence, in order


def environment(settings: Settings, gitlab_host: str | None) -> dict[str, str]:
    """The proxy variables of every stage: both spellings, as tools read one or the other."""
    url = forwarder_url(settings)
    values = {"HTTP_PROXY": url, "HTTPS_PROXY": url, "NO_PROXY": ",".join(no_proxy(settings, gitlab_host))}
    return {**values, **{k.lower(): v for k, v in values.items()}}


def daemon_proxies(settings: Settings) -> dict[str, str]:
    """`proxies` of a VM's daemon.json (booted before its job: the job's GitLab server is not
    in it; network.no_proxy is)."""
    url = forwarder_url(settings)
    return {"http-proxy": url, "https-proxy": url, "no-proxy": ",".join(no_proxy(settings, None))}
