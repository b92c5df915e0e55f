"""erasure requests -> erasures: a record removed from every place the loop copied it.

One run per request file (``erasure_sensor``); the run's config names the file, never a record
id, so no id reaches the run storage or its logs. See ``stream_sentinel.erasure.operation``.
"""

import dagster as dg

from stream_sentinel.erasure import operation
from stream_sentinel.erasure import requests as erasure_requests
from stream_sentinel.atomic import fsync_path, write_json_atomic
from stream_sentinel.resources import StreamSentinelResource

from .pools import POOL_INDEX


class ErasureConfig(dg.Config):
    files: list[str] = []  # request files in <data root>/erasures/ (empty: every file there)


@dg.asset(
    group_name="erasure",
    kinds={"duckdb", "faiss"},
    pool=POOL_INDEX,
    description="Right to erasure: each requested record removed from records, embeddings, the vector index "
    "(and every older version holding it), labels and feedback (tombstones keep the offsets), predictions, "
    "training-set rows, window state, rejects, raw and quarantined files, logs, drift reports and caches; "
    "model versions trained on it marked tainted (a tainted champion is withdrawn and a full retrain "
    "requested), their files deleted by default; an audit row per erasure in `erasures`, named by a keyed "
    "hash of the id. Requests: `stream-sentinel erase`, `DELETE /v1/records/{id}`, or a file in "
    "`<data root>/erasures/`.",
)
def erasures(context: dg.AssetExecutionContext, config: ErasureConfig,
             sentinel: StreamSentinelResource) -> dg.MaterializeResult:
    paths, s = sentinel.paths, sentinel.settings
    folder = erasure_requests.folder(paths.home)
    names = config.files or [n for n, _ in erasure_requests.pending(paths.home)]
    todo, done_files, bad = [], [], []
    for name in names:
        path = folder / name
        if not path.exists():
            continue  # done by an earlier run
        try:
            todo.extend(erasure_requests.read(path))
            done_files.append(path)
        except erasure_requests.BadRequest as exc:
            # kept for a person, beside what is wrong with it; the other files go on
            target = paths.failed / "erasures" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
            write_json_atomic(target.with_name(name + ".error.json"), {"file": name, "error": str(exc)})
            context.log.error(f"erasure request {name} set aside in failed/erasures/: {exc}")
            bad.append(name)
    result = operation.erase(paths, sentinel.store(), todo, keep_backups=s.keep_backups,
                             tainted_models=s.erasure_tainted_models,
                             index_options={"rebuild_ratio": s.rebuild_ratio, "ivf_threshold": s.ivf_threshold,
                                            "nprobe": s.nprobe})
    for path in done_files:  # the ids leave the disk with their requests
        path.unlink(missing_ok=True)
    if done_files:
        fsync_path(folder)
    outs = result.outcomes
    for o in outs:
        if o.withdrawn:
            context.log.warning(f"erasure {o.short()}: champion {o.withdrawn} was trained on the erased record and "
                                f"no longer serves; now serving: {o.serving or 'nothing until a retrain is promoted'}")
    totals = result.totals()
    return dg.MaterializeResult(metadata={
        "erasures": len(outs),
        "completed": sum(o.status == "completed" for o in outs),
        "already_erased": sum(o.status == "already_erased" for o in outs),
        "request_files": len(done_files),
        "bad_request_files": len(bad),
        "id_hashes": ", ".join(o.short() for o in outs),
        "removed": dg.MetadataValue.json(totals),
        "tainted_versions": ", ".join(sorted({v for o in outs for v in o.tainted})),
        "withdrawn_champion": next((o.withdrawn for o in outs if o.withdrawn), "") or "",
        "retrain_needed": result.retrain_needed,
        "db_bytes_after": result.db_bytes or 0,
        "duration_s": round(result.seconds, 3),
    })


erasure_job = dg.define_asset_job("erasure_job", selection=[erasures],
                                  description="Process erasure requests (see the erasures asset).")
