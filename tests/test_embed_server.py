"""The shared embedding server: same vectors as in-process, checked model id, clean fallback."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from stream_sentinel.definitions import build_definitions
from stream_sentinel.embedding.server import RemoteEmbedder, connect
from stream_sentinel.store import Store

from .conftest import drop
from .helpers import start_embed_server, stop_process


@pytest.fixture
def server(paths):
    proc = start_embed_server(paths, compile_=False)  # eager: the same vectors as in-process, bit for bit
    yield proc
    stop_process(proc)


def _ingest(paths, instance, name, records):
    from stream_sentinel import ingest

    drop(paths.raw, name, records)
    store = Store(paths.db)
    ingest.scan(paths, store, debounce_s=1)
    (batch,) = ingest.plan_batches(store)
    job = build_definitions(home=str(paths.home)).resolve_job_def("ingest_job")
    result = job.execute_in_process(run_config={"ops": {"raw_records": {"config": {"files": list(batch.files)}}}},
                                    partition_key=batch.partition_key, instance=instance)
    (mat,) = result.asset_materializations_for_node("embeddings")
    return store, mat


def test_server_gives_the_in_process_vectors_and_runs_use_it(paths, server, embedder, demo_records, instance):
    remote = connect(paths.embed_socket, embedder.model_id, embedder.dim)
    assert isinstance(remote, RemoteEmbedder)
    texts = [r["text"] for r in demo_records[:20]]
    assert np.allclose(remote.embed(texts), embedder.embed(texts), atol=1e-6)
    assert remote.embed([]).shape == (0, embedder.dim)

    # a server with another model is not used, and a client that insists gets a clear error
    assert connect(paths.embed_socket, "other-model@sha256:0", embedder.dim) is None
    with pytest.raises(RuntimeError, match="other-model"):
        RemoteEmbedder(paths.embed_socket, "other-model@sha256:0", embedder.dim).embed(["x"])

    # a Dagster run embeds through the server and says so
    store, mat = _ingest(paths, instance, "served.jsonl", demo_records[:30])
    assert mat.metadata["embedded_by"].value == "embed-server"
    with store.connect() as con:
        n = con.execute("SELECT count(*) FROM embeddings WHERE model_id = ?", [embedder.model_id]).fetchall()[0][0]
    assert n == 30

    # stopped: the socket goes away and runs embed in-process again
    server.send_signal(signal.SIGTERM)
    server.wait(30)
    assert not paths.embed_socket.exists()
    assert connect(paths.embed_socket, embedder.model_id, embedder.dim) is None


def test_the_api_falls_back_to_its_own_model_and_back_to_the_server_when_it_returns(paths, embedder, demo_records,
                                                                                  monkeypatch):
    """The API's embedding: the server while it runs; its own model (loaded once, kept) while
    the server is away; the server again once `up` has restarted it. A model id that is not
    the local model's is refused without loading the model again."""
    from stream_sentinel.config import Settings
    from stream_sentinel.embedding import embedder as embedder_mod
    from stream_sentinel.serving import embedding as api_embedding

    monkeypatch.setattr(api_embedding, "REPROBE_S", 0.5)
    loads = []
    real_load = embedder_mod.Embedder.load
    monkeypatch.setattr(embedder_mod.Embedder, "load", staticmethod(lambda *a, **k: loads.append(1) or real_load(*a, **k)))
    texts = [r["text"] for r in demo_records[:5]]
    want = embedder.embed(texts)
    emb = api_embedding.Embedding(paths, Settings(embed_compile=False))
    proc = start_embed_server(paths)
    try:
        assert np.allclose(emb.embed(texts, embedder.model_id, embedder.dim), want, atol=1e-6)
        assert emb.describe() == "server" and not loads
        stop_process(proc)  # gone: the next batch is embedded here
        assert np.allclose(emb.embed(texts, embedder.model_id, embedder.dim), want, atol=1e-5)
        assert emb.describe() == "in-process" and len(loads) == 1
        with pytest.raises(api_embedding.IndexModelMismatch):
            emb.embed(texts, "other-model@sha256:0", embedder.dim)
        with pytest.raises(api_embedding.IndexModelMismatch):
            emb.embed(texts, "other-model@sha256:0", embedder.dim)
        assert len(loads) == 1  # refused by the model already loaded, not by loading it again
        proc = start_embed_server(paths)  # restarted
        time.sleep(0.6)
        assert np.allclose(emb.embed(texts, embedder.model_id, embedder.dim), want, atol=1e-6)
        assert emb.describe() == "server" and len(loads) == 1
        stop_process(proc)  # away again: the model loaded before embeds, not a second load
        assert np.allclose(emb.embed(texts, embedder.model_id, embedder.dim), want, atol=1e-5)
        assert emb.describe() == "in-process" and len(loads) == 1
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_server_compiles_in_the_background_and_serves_close_vectors(paths, embedder, demo_records, instance):
    proc = start_embed_server(paths, compile_=True)
    try:
        remote = connect(paths.embed_socket, embedder.model_id, embedder.dim)
        texts = [r["text"] for r in demo_records[200:260]]
        deadline = time.monotonic() + 600
        while not remote.ping().get("compiled"):  # served eager meanwhile
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the embedding server did not finish compiling"
            time.sleep(1)
        got, want = remote.embed(texts), embedder.embed(texts)
        assert remote.compiled is True
        assert np.sum(got * want, axis=1).min() > 0.99  # bf16 rounding apart, same model id
        store, mat = _ingest(paths, instance, "compiled.jsonl", demo_records[:20])
        assert mat.metadata["embedded_by"].value == "embed-server (compiled)"
        stop_process(proc)
        # its model thread and OpenMP worker, pinned one per CPU once compiled (openmp.py)
        assert "model threads pinned one per CPU" in proc.stderr.read()
    finally:
        stop_process(proc)


def test_concurrent_clients_are_embedded_together_by_the_one_model_thread(tmp_path, embedder, demo_records):
    """Connections are served by threads, the model by one (embedding/server.py, openmp.py: a
    model called from a thread per connection keeps an OpenMP team per thread): texts that
    queue while the model is busy go in one call, and each client gets its own vectors."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from stream_sentinel.embedding.server import EmbedServer

    class Recording:  # the real model; its first call waits, so that the others queue behind it
        model_id, dim, compiled, compile_error = embedder.model_id, embedder.dim, False, None

        def __init__(self):
            self.calls, self.gate = [], threading.Event()

        def embed(self, texts):
            self.calls.append((len(texts), threading.current_thread().name))
            self.gate.wait(30)
            return embedder.embed(texts)

    model = Recording()
    server = EmbedServer(tmp_path / "embed.sock", model)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        texts = [r["text"][:400] for r in demo_records[:9]]
        remote = RemoteEmbedder(tmp_path / "embed.sock", model.model_id, model.dim, timeout_s=60)
        with ThreadPoolExecutor(9) as pool:
            first = pool.submit(remote.embed, texts[:1])
            deadline = time.monotonic() + 120
            while not model.calls:
                assert time.monotonic() < deadline and not first.done(), first.exception() if first.done() else ""
                time.sleep(0.01)
            rest = [pool.submit(remote.embed, [t]) for t in texts[1:]]
            deadline = time.monotonic() + 120
            while server.model.pending < 8:  # all eight connections are waiting for the model
                assert time.monotonic() < deadline, (server.model.pending, model.calls, [f.done() for f in rest])
                time.sleep(0.01)
            model.gate.set()
            got = [first.result(60)] + [f.result(60) for f in rest]
        assert model.calls == [(1, "embed-model"), (8, "embed-model")]
        want = embedder.embed(texts)
        for vec, w in zip(got, want):
            assert vec.shape == (1, model.dim) and float(vec[0] @ w) > 0.999
    finally:
        server.shutdown()
        server.server_close()


def test_a_tcp_server_serves_runs_on_other_machines(paths, embedder, demo_records, instance, monkeypatch):
    """`embed-server --socket tcp://HOST:PORT` (a cluster's embedding service): the same vectors,
    and a run told STREAM_SENTINEL_EMBED_SERVER embeds through it; a bad address is no server."""
    import os
    import subprocess
    import sys

    from stream_sentinel.devtools.kafka_broker import free_port
    from stream_sentinel.embedding.server import ADDRESS_ENV

    address = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "stream_sentinel.cli", "embed-server", "--no-compile",
                             "--socket", address], env={**os.environ, "STREAM_SENTINEL_HOME": str(paths.home)},
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while (remote := connect(address, embedder.model_id, embedder.dim)) is None:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the TCP embedding server did not come up"
            time.sleep(0.5)
        texts = [r["text"] for r in demo_records[:20]]
        assert np.allclose(remote.embed(texts), embedder.embed(texts), atol=1e-6)
        assert not paths.embed_socket.exists()  # nothing listens on the data root's socket
        monkeypatch.setenv(ADDRESS_ENV, address)
        _, mat = _ingest(paths, instance, "tcp.jsonl", demo_records[:10])
        assert mat.metadata["embedded_by"].value == "embed-server"
    finally:
        stop_process(proc)
    assert connect(address, embedder.model_id, embedder.dim) is None  # gone: runs embed in-process
    assert connect("tcp://nowhere", embedder.model_id, embedder.dim) is None
