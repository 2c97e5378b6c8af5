"""Serve a daemon's exporter (/metrics, /healthz: protocol/metrics.py) from a daemon thread.

The same application on the same server class as worker/metrics_http.py
(ps/ and worker/ may not import each other, and protocol/ opens no sockets).
"""
from __future__ import annotations

import logging
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client.exposition import ThreadingWSGIServer

from protocol.metrics import Health, MetricsRegistry, exporter_app

log = logging.getLogger("pscluster.metrics")


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # scrapes are not news
        pass


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


def serve_metrics(registry: MetricsRegistry, health: Health, port: int, host: str = "127.0.0.1"):
    """Serve the exporter on host:port (0: a free one) from a daemon thread.

    Returns the server (its port in .server_port); raises OSError.
    """
    bare = host.strip("[]")
    server = make_server(bare, port, exporter_app(registry, health), handler_class=_Quiet,
                         server_class=_Server6 if ":" in bare else ThreadingWSGIServer)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    url = f"http://{f'[{bare}]' if ':' in bare else bare}:{server.server_port}"
    log.info("exporter serving", extra={"metrics": f"{url}/metrics", "healthz": f"{url}/healthz"})
    return server
