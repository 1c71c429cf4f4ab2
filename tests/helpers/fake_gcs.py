"""An in-memory Google Cloud Storage server on localhost, for testing gs:// paths without a network.

`gcp-storage-emulator` (a test dependency) speaks the GCS JSON API. Both clients easyppo uses for
gs:// paths are pointed at it through their standard test hooks: gcsfs (epath's fsspec backend, for
every file easyppo itself writes or reads) through ``STORAGE_EMULATOR_HOST``, and TensorStore (Orbax's
array storage) through ``TENSORSTORE_GCS_HTTP_URL``. Nothing is mocked inside easyppo.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import socket
import socketserver
from collections.abc import Iterator
from unittest import mock


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_generation_header(handler):
    """``handler`` also sending ``x-goog-generation`` with an object's contents, as GCS does; the
    emulator omits it, and TensorStore needs it for its conditional writes (OCDBT manifests)."""

    def handle(request, response, storage, *args, **kwargs):
        result = handler(request, response, storage, *args, **kwargs)
        params = getattr(request, "params", {}) or {}
        if "object_id" in params and response.status.value in (200, 206):
            with contextlib.suppress(Exception):
                obj = storage.get_file_obj(params["bucket_name"], params["object_id"])
                response["x-goog-generation"] = str(obj["generation"])
        return result

    return handle


def _handlers(emulator):
    wrapped = {emulator.objects.download, emulator.objects.get}
    return tuple(
        (route, {method: _with_generation_header(fn) if fn in wrapped else fn for method, fn in table.items()})
        for route, table in emulator.HANDLERS
    )


@contextlib.contextmanager
def fake_gcs(bucket: str = "bucket") -> Iterator[str]:
    """Serves one empty bucket for the duration of the block; yields the server's URL."""
    from gcp_storage_emulator import server as emulator

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_CLOUD_PROJECT": "easyppo-test",
        "NO_GCE_CHECK": "true",  # no metadata server to ask for credentials
    }
    # A client that closes a connection early makes the emulator print a traceback; it is harmless.
    # The emulator serves one request at a time; under load TensorStore's requests then time out and
    # are retried while the first attempt is still queued. A thread per request keeps them apart.
    with (
        mock.patch.object(emulator.server, "HTTPServer", http.server.ThreadingHTTPServer),
        mock.patch.object(emulator, "HANDLERS", _handlers(emulator)),
        mock.patch.dict(os.environ, env),
        mock.patch.object(socketserver.BaseServer, "handle_error", lambda *args: None),
    ):
        server.start()
        try:
            yield url
        finally:
            server.stop()
