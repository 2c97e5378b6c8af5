"""The worker's Prometheus endpoint (`psctl worker --metrics-port`), on a daemon thread."""
from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from protocol.metrics import MetricsRegistry


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # scrapes are not news
        pass


def start_exporter(registry: MetricsRegistry, port: int, host: str = "127.0.0.1"):
    """Serve `registry` at /metrics; returns the server (its port in .server_port). Raises OSError."""

    def app(environ, start_response):
        found = environ.get("PATH_INFO", "").startswith("/metrics")
        start_response("200 OK" if found else "404 Not Found", [("Content-Type", "text/plain; version=0.0.4")])
        return [registry.render().encode()]

    server = make_server(host, port, app, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
