"""Shared by the bench scripts: the demo corpus and its embeddings, computed once.

Embedding the 6,046 demo e-mails takes minutes on two cores; the vectors are cached
under the demo-data cache, keyed by the embedding model's content hash, so a second
benchmark run (or another script) measures what it is about, not the embedding.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
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
