"""A stand-in for a company's HTTP proxy that asks for a password: Debian's squid with basic
auth (an htpasswd file, squid's own basic_ncsa_auth helper), on an address of this host. Used by
the tests of the proxy forwarder; there is no company network here."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SQUID = "/usr/sbin/squid"
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"


@contextmanager
def company_proxy(address: str, port: int, user: str, password: str) -> Iterator[tuple[str, Path]]:
    """squid on address:port allowing `user` with `password` (and nobody else) anywhere: its URL
    and its access log. Its files live in a directory its unprivileged user can read."""
    directory = Path(tempfile.mkdtemp(prefix="lvx-company-proxy-"))
    os.chmod(directory, 0o755)
    htpasswd, access_log = directory / "htpasswd", directory / "access.log"
    subprocess.run(["htpasswd", "-b", "-m", "-c", str(htpasswd), user, password], check=True, capture_output=True)
    os.chmod(htpasswd, 0o644)
    access_log.touch()
    os.chmod(access_log, 0o666)
    config = directory / "squid.conf"
    config.write_text(
        f"http_port {address}:{port}\n"
        f"auth_param basic program {NCSA_AUTH} {htpasswd}\n"
        "auth_param basic realm company-proxy\n"
        "acl staff proxy_auth REQUIRED\n"
        "http_access allow staff\n"
        "http_access deny all\n"
        "cache deny all\n"
        "pinger_enable off\n"
        "shutdown_lifetime 1 seconds\n"
        "pid_filename none\n"
        "cache_log /dev/null\n"
        f"access_log stdio:{access_log}\n"
        "coredump_dir /tmp\n"
        "visible_hostname company-proxy\n"
    )
    with open(directory / "squid.out", "wb") as out:
        proc = subprocess.Popen([SQUID, "-N", "-d", "1", "-f", str(config)], stdout=out, stderr=out, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((address, port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    said = (directory / "squid.out").read_text()[-2000:]
                    raise RuntimeError(f"squid did not start: {said}") from None
                time.sleep(0.2)
        yield f"http://{address}:{port}", access_log
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
