"""What `stream-sentinel status` (and `run --once`'s summary) reports about a data root.

Plain queries over the store, the index and the registry: no Dagster, so `status` starts
quickly and the same figures are available to any caller.
"""

from __future__ import annotations


from .config import Paths, Settings
from .index import IndexStore
from .learning.loop import learning_metrics
from .learning.registry import ModelRegistry
from .store import Store
from .windows.state import from_us


def embedding_model_id(settings: Settings) -> str:
    """The id the embeddings of this configuration are stored under (model, precision)."""
    from .embedding.embedder import model_id

    return model_id(settings.model_path, settings.embed_precision, settings.device, settings.embed_backend)


def collect_status(paths: Paths, settings: Settings | None = None) -> dict:
    """Counts, lag, index, labels and learning figures of one data root, as plain values."""
    settings = settings or Settings.from_env()
    mid = embedding_model_id(settings)
    store = Store.of(paths)
    out: dict = {"home": str(paths.home), "model_id": mid}
    out.update(store.status())
    with store.connect() as con:
        out["embedded"] = int(con.execute(
            "SELECT count(*) FROM embeddings WHERE model_id = ?", [mid]).fetchone()[0])
    meta = IndexStore(paths.index).read_meta()
    out["index_ntotal"] = meta.ntotal if meta else 0
    out["index_version"] = meta.version if meta else None
    out["index_model_id"] = meta.model_id if meta else None
    out["unembedded"] = out["records"] - out["embedded"]
    with store.connect() as con:
        one = lambda q: int(con.execute(q).fetchall()[0][0])  # noqa: E731
        out["feedback_events"] = one("SELECT count(*) FROM feedback_events")
        out["feedback_rejects"] = one("SELECT count(*) FROM feedback_rejects")
        out["quarantined_feedback_files"] = one("SELECT count(*) FROM feedback_files WHERE status = 'quarantined'")
        # entries of raw/ and feedback/ the scans cannot read (what, and why), 20 at most
        out["scan_problem_paths"] = {f"{area}/{path}": reason for area, path, reason in con.execute(
            "SELECT area, path, reason FROM scan_problems ORDER BY area, path LIMIT 20").fetchall()}
        out["labels"] = {status: n for status, n in con.execute(
            "SELECT status, count(*) FROM labels GROUP BY 1 ORDER BY 1").fetchall()}
        out["labels"]["total"] = sum(out["labels"].values())
        out["kafka_lag"] = {f"{t}:{p}": lag for t, p, lag in con.execute(
            'SELECT topic, "partition", lag FROM kafka_lag ORDER BY 1, 2').fetchall()}
        # stream windows: what is declared and computed, what waits, and records that came late
        n_windows, watermark = con.execute("SELECT count(*), max(watermark_us) FROM window_defs").fetchall()[0]
        if n_windows:
            out["windows"] = {
                "declared": int(n_windows),
                "computed": one("SELECT count(*) FROM window_features"),
                "late_records": one("SELECT count(*) FROM window_features WHERE late"),
                "watermark": from_us(watermark).isoformat() if watermark is not None else None,
            }
            out["windows"]["pending"] = out["records"] - out["windows"]["computed"]
        # erasures: done, under way (or interrupted: a request file waits for its rerun), lifted
        done, running, lifted = con.execute(
            """SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'running'),
                      count(*) FILTER (WHERE lifted_at IS NOT NULL) FROM erasures""").fetchall()[0]
        from .erasure import requests as erasure_requests

        out["erasures"] = {"completed": int(done), "running": int(running), "lifted": int(lifted),
                           "requests_waiting": len(erasure_requests.pending(paths.home)),
                           "tainted_versions": one("SELECT count(*) FROM model_versions WHERE tainted_by IS NOT NULL")}
    out["learning"] = learning_metrics(store, ModelRegistry(paths.models, store).reconcile())
    return out
