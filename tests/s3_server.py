"""A real S3 API on loopback for the remote-storage tests: moto's ``ThreadedMotoServer`` on a
free port, and a small HTTP proxy in front of it that can answer chosen requests with S3 errors
(500 InternalError, 503 SlowDown) before passing the rest through unchanged."""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moto.server import ThreadedMotoServer

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class S3Server:
    """moto on ``127.0.0.1``; ``stop()``/``start()`` keep the buckets (moto's state is in-process)."""

    def __init__(self) -> None:
        self.port = 0
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Faults:
    """Which requests the proxy fails: the next ``count`` whose method is in ``methods`` and whose
    path contains ``path_part`` get ``status`` with S3 error ``code``."""

    count: int = 0
    status: int = 500
    code: str = "InternalError"
    methods: tuple[str, ...] = ("PUT", "POST")
    path_part: str = "/objects-"
    injected: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, method: str, path: str) -> bool:
        with self.lock:
            if self.count > 0 and method in self.methods and self.path_part in path:
                self.count -= 1
                self.injected += 1
                return True
            return False


class FaultProxy:
    """Forwards every request to ``upstream_port``, except those ``faults`` picks."""

    def __init__(self, upstream_port: int, faults: Faults) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                if faults.take(self.command, self.path):
                    payload = (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{faults.code}</Code>"
                        f"<Message>injected by the test proxy</Message></Error>"
                    ).encode()
                    self.send_response(faults.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_HEADERS and (key.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.upstream_port = upstream_port
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def options(endpoint: str, *, attempts: int = 2) -> dict[str, object]:
    """s3fs storage options for a loopback endpoint (dummy credentials; few client retries so a
    persistent fault surfaces quickly)."""
    return {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": attempts, "mode": "standard"}},
        "skip_instance_cache": True,
    }
