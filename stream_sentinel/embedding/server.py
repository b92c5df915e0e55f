"""A warm embedding model shared by every run, over a Unix socket.

Dagster launches each run in a fresh process. Importing torch and sentence-transformers
and loading the model costs about 5 s of that process's life, which is most of a
micro-batch's drop-to-searchable time. ``stream-sentinel up`` therefore starts this
server next to the daemon. It loads the model once. Runs send it texts and get back the
same vectors the in-process embedder would give (same model, same precision; the id is
checked on every connection).

Without the server, a run embeds in its own process, as before. The server is an
optimisation, never a dependency.

Being long-lived, the server is also where compiling the model pays (``encoder.py``): it
compiles in a background thread at start and serves eager until that is done. The reply
header says which (``compiled``), and runs record it in the embeddings metadata.

Protocol: one request per connection. A frame is a 4-byte big-endian length followed by
the payload. The request payload is JSON ``{"model_id": ..., "texts": [...]}``, or
``{"ping": true}``. The reply is a JSON header frame ``{"ok", "model_id", "dim", "compiled",
"n" | "error"}``, then (when ok) one frame of n x dim float32 in little-endian order.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

MAX_FRAME = 256 * 1024 * 1024


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">I", len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes is over the {MAX_FRAME} limit")
    return _recv_exact(sock, n)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: EmbedServer = self.server  # type: ignore[assignment]
        try:
            req = json.loads(_recv(self.request))
            head = {"ok": True, "model_id": server.embedder.model_id, "dim": server.embedder.dim,
                    "compiled": server.embedder.compiled}
            if req.get("ping"):
                if server.embedder.compile_error:
                    head["compile_error"] = server.embedder.compile_error
                _send(self.request, json.dumps(head).encode())
                return
            if req.get("model_id") != server.embedder.model_id:
                head = {"ok": False, "model_id": server.embedder.model_id,
                        "error": f"this server embeds with {server.embedder.model_id}, not {req.get('model_id')}"}
                _send(self.request, json.dumps(head).encode())
                return
            texts = req["texts"]
            with server.lock:  # one batch at a time: the model uses every core already
                vecs = server.embedder.embed(texts)
            head["n"] = len(texts)
            _send(self.request, json.dumps(head).encode())
            _send(self.request, np.ascontiguousarray(vecs, dtype="<f4").tobytes())
        except (ConnectionError, ValueError, KeyError, json.JSONDecodeError) as exc:
            try:
                _send(self.request, json.dumps({"ok": False, "error": repr(exc)[:500]}).encode())
            except OSError:
                pass


class EmbedServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, embedder):
        self.embedder = embedder
        self.lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()  # a stale socket of a server that died
        super().__init__(str(path), _Handler)
        os.chmod(path, 0o600)  # the data root's owner only


def serve(path: Path, embedder, ready=None, compile_: bool = False, log=None, granule: int | None = None) -> None:
    embedder.embed(["warm up"])  # import and load now, not on the first run's request
    if compile_:
        def compile_in_background() -> None:
            ok = embedder.compile(granule)
            if log is not None:
                log(f"embedding server: model compiled ({embedder.model_id})" if ok
                    else f"embedding server: not compiled, serving eager: {embedder.compile_error}")

        threading.Thread(target=compile_in_background, name="embed-compile", daemon=True).start()
    with EmbedServer(path, embedder) as server:
        if ready is not None:
            ready()
        try:
            server.serve_forever(poll_interval=0.5)
        finally:
            try:
                path.unlink()
            except FileNotFoundError:
                pass


class RemoteEmbedder:
    """The ``TextEmbedder`` interface over a running server."""

    def __init__(self, path: Path, model_id: str, dim: int, timeout_s: float = 600.0):
        self.path, self.model_id, self.dim, self.timeout_s = Path(path), model_id, dim, timeout_s
        self.compiled: bool | None = None  # as the server said in its last reply

    def _call(self, req: dict) -> tuple[dict, bytes | None]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout_s)
            sock.connect(str(self.path))
            _send(sock, json.dumps(req).encode())
            head = json.loads(_recv(sock))
            body = _recv(sock) if head.get("ok") and "n" in head else None
        return head, body

    def ping(self) -> dict:
        head, _ = self._call({"ping": True})
        return head

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        head, body = self._call({"model_id": self.model_id, "texts": list(texts)})
        if not head.get("ok"):
            raise RuntimeError(f"embedding server: {head.get('error')}")
        self.compiled = bool(head.get("compiled"))
        return np.frombuffer(body, dtype="<f4").reshape(head["n"], head["dim"]).astype(np.float32)


def connect(path: Path, model_id: str, dim: int) -> RemoteEmbedder | None:
    """The server at ``path`` if it is up and embeds with ``model_id``; else None (embed locally)."""
    if not Path(path).exists():
        return None
    remote = RemoteEmbedder(path, model_id, dim, timeout_s=600.0)
    try:
        remote.timeout_s = 2.0
        head = remote.ping()
    except OSError:
        return None
    finally:
        remote.timeout_s = 600.0
    return remote if head.get("ok") and head.get("model_id") == model_id else None
