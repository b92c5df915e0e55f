"""A warm embedding model shared by every run, over a Unix socket (or TCP, for a cluster).

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

Connections are served by threads, the model by one worker thread: the texts of concurrent
clients (the API's batches, a run's micro-batch) wait in one queue and are embedded together
(``batching.ContinuousBatcher``). One thread also keeps torch on one OpenMP team (see
``batching.py``: a model called from a new thread per connection ran 0.6-0.7x as fast).

Address: a Unix socket path (the default, ``<data root>/embedder.sock``: one machine, the
data root's owner only), or ``tcp://host:port`` where runs and the API live on other machines
(a Kubernetes Service; ``STREAM_SENTINEL_EMBED_SERVER`` tells clients where, ``embed-server
--socket tcp://0.0.0.0:8766`` where to listen). TCP has no authentication: keep it inside the
cluster's network (a ClusterIP Service, a NetworkPolicy), as the texts travel in the clear.

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

from ..batching import ContinuousBatcher, split_rows
from ..openmp import TeamPinning

MAX_FRAME = 256 * 1024 * 1024
ADDRESS_ENV = "STREAM_SENTINEL_EMBED_SERVER"


def parse_address(address: str | os.PathLike[str]) -> tuple[str, object]:
    """``("tcp", (host, port))`` for ``tcp://host:port``, else ``("unix", Path)``."""
    text = str(address)
    if text.startswith("tcp://"):
        host, _, port = text[len("tcp://"):].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"embedding server address {text!r}: expected tcp://host:port")
        return "tcp", (host.strip("[]"), int(port))
    return "unix", Path(text)


def default_address(embed_socket: Path, environ=None) -> str | Path:
    """Where clients find the server: ``STREAM_SENTINEL_EMBED_SERVER`` when set, else the data
    root's socket."""
    return (os.environ if environ is None else environ).get(ADDRESS_ENV, "").strip() or embed_socket


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
            vecs = server.model.submit(None, texts, len(texts)).result()
            head["n"] = len(texts)
            _send(self.request, json.dumps(head).encode())
            _send(self.request, np.ascontiguousarray(vecs, dtype="<f4").tobytes())
        except (ConnectionError, ValueError, KeyError, json.JSONDecodeError) as exc:
            try:
                _send(self.request, json.dumps({"ok": False, "error": repr(exc)[:500]}).encode())
            except OSError:
                pass


BATCH_TEXTS = 64  # texts of concurrent requests embedded in one call (a larger request goes alone)


def model_worker(embedder, pin: bool = False, log=None) -> ContinuousBatcher:
    """The one thread that runs the model: every request's texts, concurrent ones together;
    with ``pin``, it and its OpenMP workers are pinned one per CPU once the model is compiled
    (``openmp.TeamPinning``)."""
    pinning = TeamPinning(pin, "embedding server", log)

    def run(_key, groups: list[list[str]]) -> list[np.ndarray]:
        vecs = embedder.embed([t for g in groups for t in g])
        if pinning.pending:
            pinning.after_call(bool(embedder.compiled))
        return split_rows(vecs, groups)

    return ContinuousBatcher(run, BATCH_TEXTS, name="embed-model")


class TcpEmbedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # clients connect per call: the API's batches and every run's

    def __init__(self, addr: tuple[str, int], embedder, model: ContinuousBatcher | None = None):
        self.embedder = embedder
        self.model = model or model_worker(embedder)
        super().__init__(addr, _Handler)


class EmbedServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128  # clients connect per call: the API's batches and every run's

    def __init__(self, path: Path, embedder, model: ContinuousBatcher | None = None):
        self.embedder = embedder
        self.model = model or model_worker(embedder)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()  # a stale socket of a server that died
        super().__init__(str(path), _Handler)
        os.chmod(path, 0o600)  # the data root's owner only


def serve(path: Path | str, embedder, ready=None, compile_: bool = False, log=None, pin: bool = False) -> None:
    """Serve on ``path``: a Unix socket path or ``tcp://host:port``."""
    kind, where = parse_address(path)
    if compile_:
        from .encoder import keep_kernels

        keep_kernels()  # before the model's first kernel
    model = model_worker(embedder, pin, log)
    model.submit(None, ["warm up"], 1).result()  # load now (in the model's thread), not on the first request
    if compile_:
        def compile_in_background() -> None:
            ok = embedder.compile()
            if log is not None:
                log(f"embedding server: model compiled ({embedder.model_id})" if ok
                    else f"embedding server: not compiled, serving eager: {embedder.compile_error}")

        threading.Thread(target=compile_in_background, name="embed-compile", daemon=True).start()
    with (TcpEmbedServer(where, embedder, model) if kind == "tcp" else EmbedServer(where, embedder, model)) as server:
        if ready is not None:
            ready()
        try:
            server.serve_forever(poll_interval=0.5)
        finally:
            if kind == "unix":
                try:
                    where.unlink()
                except FileNotFoundError:
                    pass


class RemoteEmbedder:
    """The ``TextEmbedder`` interface over a running server."""

    def __init__(self, path: Path | str, model_id: str, dim: int, timeout_s: float = 600.0):
        self.kind, self.where = parse_address(path)
        self.path, self.model_id, self.dim, self.timeout_s = path, model_id, dim, timeout_s
        self.compiled: bool | None = None  # as the server said in its last reply

    def _open(self) -> socket.socket:
        if self.kind == "tcp":
            return socket.create_connection(self.where, timeout=self.timeout_s)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(str(self.where))
        except BaseException:
            sock.close()
            raise
        return sock

    def _call(self, req: dict) -> tuple[dict, bytes | None]:
        with self._open() as sock:
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


def connect(path: Path | str, model_id: str, dim: int) -> RemoteEmbedder | None:
    """The server at ``path`` (a socket path or ``tcp://host:port``) if it is up and embeds with
    ``model_id``; else None (embed locally)."""
    try:
        kind, where = parse_address(path)
    except ValueError:
        return None
    if kind == "unix" and not where.exists():
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
