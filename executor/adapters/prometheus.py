"""prometheus_client, the one adapter for it: our metric families (core.metrics) in Prometheus'
exposition format, served over HTTP with /healthz by a thread of the host agent.

Every scrape calls `collect()` afresh (a custom collector): the values come from the job
history and live state, not from counters in this process, so an agent restart loses nothing.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from executor.core.metrics import COUNTER, HISTOGRAM, INFO, PREFIX, Buckets, Family

HEALTH_PATH = "/healthz"
Health = Callable[[], tuple[bool, dict[str, Any]]]


def _metric(family: Family) -> Metric:
    name, labels = PREFIX + family.name, list(family.label_names)
    rows = [([sample.labels.get(label, "") for label in labels], sample.value) for sample in family.samples]
    if family.kind == HISTOGRAM:
        histogram = HistogramMetricFamily(name, family.help, labels=labels)
        for values, value in rows:
            assert isinstance(value, Buckets)
            buckets = [(_bound(b), float(c)) for b, c in value.cumulative]
            histogram.add_metric(values, [*buckets, ("+Inf", float(value.count))], value.sum)
        return histogram
    if family.kind == INFO:
        info = InfoMetricFamily(name, family.help, labels=labels)
        for values, value in rows:
            assert isinstance(value, Mapping)
            info.add_metric(values, dict(value))
        return info
    number = (CounterMetricFamily if family.kind == COUNTER else GaugeMetricFamily)(name, family.help, labels=labels)
    for values, value in rows:
        assert isinstance(value, (int, float))
        number.add_metric(values, value)
    return number


def _bound(value: float) -> str:
    return repr(float(value))


class _Families(Collector):
    def __init__(self, collect: Callable[[], Iterable[Family]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        for family in self._collect():
            yield _metric(family)


def _registry(collect: Callable[[], Iterable[Family]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(collect))
    return registry


def exposition(collect: Callable[[], Iterable[Family]]) -> bytes:
    """The text a scrape would get now."""
    return generate_latest(_registry(collect))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes come every few seconds: not worth a log line each."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """/metrics (and any other path but /healthz, as prometheus_client does) and /healthz on
    `host:port`, in a daemon thread until `close()`."""

    def __init__(self, host: str, port: int, collect: Callable[[], Iterable[Family]], health: Health) -> None:
        metrics_app = make_wsgi_app(_registry(collect))

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == HEALTH_PATH:
                ok, detail = health()
                body = json.dumps({"ok": ok, **detail}, sort_keys=True).encode() + b"\n"
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
                return [body]
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def ask_health(host: str, port: int, timeout: float = 3.0) -> tuple[int | None, str]:
    """What /healthz at host:port says: (HTTP status, body), or (None, why nobody answered)."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with urllib.request.urlopen(f"http://{address}{HEALTH_PATH}", timeout=timeout) as resp:
            return resp.status, resp.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4096).decode("utf-8", "replace")
    except OSError as exc:
        return None, str(getattr(exc, "reason", exc))
