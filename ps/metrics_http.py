"""Serve a daemon's metrics at http://HOST:PORT/metrics from a daemon thread."""
from __future__ import annotations

import http.server
import threading

from protocol.metrics import MetricsRegistry


def serve_metrics(registry: MetricsRegistry, port: int, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """Start the exporter in a daemon thread; returns the server (its port in .server_address)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = registry.render().encode()
            self.send_response(200 if self.path.startswith("/metrics") else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes are not news
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
