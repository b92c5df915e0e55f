"""Shared by the bench scripts: the demo corpus and its embeddings, computed once.

Embedding the 6,046 demo e-mails takes minutes on two cores; the vectors are cached
under the demo-data cache, keyed by the embedding model's content hash, so a second
benchmark run (or another script) measures what it is about, not the embedding.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stream_sentinel.devtools import demo  # noqa: E402
from stream_sentinel.atomic import write_bytes_atomic  # noqa: E402


def save(figures: dict) -> None:
    """bench/results/<figures["bench"]>.json, and the one JSON line every script ends with."""
    out = ROOT / "bench" / "results" / f"{figures['bench']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


def corpus() -> tuple[list[dict], dict[str, str], dict[str, str]]:
    """Records in stream order, label by record id, group (collection period) by record id."""
    records_path, labels_path = demo.convert(quiet=True)
    recs = demo.load_records(records_path)
    rows = [json.loads(x) for x in labels_path.read_text().splitlines()]
    return recs, {r["record_id"]: r["label"] for r in rows}, {r["record_id"]: r["group"] for r in rows}


def demo_vectors(embedder, recs: list[dict]) -> tuple[np.ndarray, float]:
    """(vectors, seconds spent embedding now; 0.0 when they came from the cache)."""
    import io

    key = hashlib.sha256((embedder.model_id + "\n" + "\n".join(r["id"] for r in recs)).encode()).hexdigest()[:16]
    path = demo.cache_dir() / "vectors" / f"{key}.npy"
    if path.exists():
        return np.load(path), 0.0
    started = time.perf_counter()
    vecs = embedder.embed([r["text"] for r in recs])
    seconds = time.perf_counter() - started
    buf = io.BytesIO()
    np.save(buf, np.asarray(vecs, dtype=np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buf.getvalue())
    return vecs, seconds


def cpu_name() -> str:
    """The CPU a figure came from (machines differ: say which)."""
    import platform

    return next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")), platform.processor())


class Precomputed:
    """An embedder that answers with vectors computed before (by the real model)."""

    def __init__(self, embedder, by_text: dict):
        self.model_id, self.dim, self.by_text = embedder.model_id, embedder.dim, by_text

    def embed(self, texts):
        return np.stack([self.by_text[t] for t in texts])


def build_root(root: Path, recs: list[dict], vecs: np.ndarray, embedder) -> str:
    """A data root holding ``recs`` through the product's file path (raw files, scan, batches),
    their precomputed vectors and the real FAISS index; the index version."""
    from stream_sentinel import ingest, pipeline
    from stream_sentinel.config import Paths, Settings
    from stream_sentinel.index import IndexStore
    from stream_sentinel.store import Store

    paths = Paths.at(root).ensure()
    store = Store(paths.db).init()
    for i in range(0, len(recs), 500):
        (paths.raw / f"part-{i:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[i:i + 500]))
    ingest.scan(paths, store, debounce_s=0)
    for b in ingest.plan_batches(store, 100, 10_000_000):
        ingest.process_files(paths, store, list(b.files))
    pipeline.embed_partition(store, Precomputed(embedder, {r["text"]: v for r, v in zip(recs, vecs)}), None)
    s = Settings.from_env()  # the index type the product would build at this size
    return pipeline.update_index(store, IndexStore(paths.index), embedder.model_id, embedder.dim,
                                 ivf_threshold=s.ivf_threshold, nprobe=s.nprobe).meta.version


@contextmanager
def api_server(root: Path, log_path: Path, env: dict | None = None, ready=lambda health: True,
               timeout_s: float = 900):
    """`stream-sentinel serve` on ``root`` in its own process; yields (base url, pid) once
    ``ready(healthz)`` holds."""
    import httpx

    from stream_sentinel.devtools.kafka_broker import free_port

    port = free_port()
    environ = {**os.environ, "STREAM_SENTINEL_HOME": str(root), **(env or {})}
    environ.pop("STREAM_SENTINEL_API_TOKEN", None)
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "stream_sentinel.cli", "serve", "--port", str(port)],
                                  env=environ, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=url, timeout=60) as api:
            while True:
                try:
                    if ready(api.get("/healthz").json()):
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"the server did not get ready:\n{log_path.read_text()}")
                time.sleep(0.2)
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(30)


def wait_compiled(url: str, timeout_s: float = 600.0) -> bool:
    """Wait until the server's embedder runs compiled (it compiles in the background after its
    first text, when ``STREAM_SENTINEL_EMBED_COMPILE`` is on); False when it is off or did not
    finish in time (the figures are then eager ones, and the caller says so)."""
    import httpx

    from stream_sentinel.config import Settings

    if not Settings.from_env().embed_compile:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(url + "/healthz", timeout=30).json()["loaded"].get("embedder_compiled"):
            return True
        time.sleep(0.5)
    return False


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(seconds), q)) * 1000.0, 2)
