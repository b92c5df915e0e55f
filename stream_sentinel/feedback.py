"""Label feedback: the public contract, exactly-once storage, and consensus labels.

A feedback message (Kafka value, or one line of a ``feedback/*.jsonl`` file) is a JSON
object ``{record_id, label, source, confidence (0..1, default 1), ts (ISO-8601)}``; the
Kafka key, when present, must equal ``record_id``.

Every message has a position ``(topic, partition, offset)`` — for a drop-folder file
that is ``("file:<sha256>", 0, <line>)`` — and ``feedback_events`` is keyed by it, so a
replayed range or a retried run adds nothing twice. Invalid messages go to
``feedback_rejects`` (and, for Kafka, to the dead-letter topic).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable

import numpy as np
import pandas as pd

from .config import ConsensusConfig
from .records import MAX_ID_CHARS, JSONProblem, TimeOutOfRange, is_utf8, loads, parse_event_time, safe_text, show
from .store import Store



@dataclass(frozen=True)
class Position:
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Event:
    pos: Position
    record_id: str
    label: str
    source: str
    confidence: float
    ts: datetime


@dataclass(frozen=True)
class Rejected:
    pos: Position
    key: str | None  # readable text of the key, for the table (bytes decoded with U+FFFD)
    raw: str  # readable text of the value, for the table
    rule: str
    error: str
    # the original message, exactly, for the dead-letter copy and feedback_rejects.raw_bytes:
    raw_bytes: bytes | None = None  # the value (None: a null value, a tombstone)
    key_bytes: bytes | None = None  # the key (None: no key)
    headers: tuple[tuple[str, bytes | None], ...] = ()  # Kafka headers, in order
    timestamp_ms: int | None = None  # Kafka timestamp of the source message


def _as_bytes(x: bytes | str | None) -> bytes | None:
    # surrogatepass: a str holding a lone surrogate has no UTF-8 form; keep its code units
    return x.encode("utf-8", "surrogatepass") if isinstance(x, str) else x


def validate(pos: Position, value: bytes | str | None, key: bytes | str | None,
             allowed_labels: frozenset[str] | None) -> Event | Rejected:
    """One message against the feedback contract.

    Never raises: a poison value (nesting deeper than ``MAX_DEPTH``, a 5000-digit number, a
    lone surrogate, a ts pandas cannot hold, a 400-digit confidence) is a :class:`Rejected`
    with its rule, and every field of a Rejected is valid UTF-8, so it can be stored."""
    key_s = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    key_safe = None if key_s is None else safe_text(key_s)
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return Rejected(pos, key_safe, value.decode("utf-8", "replace"), "not_utf8", "value is not UTF-8",
                            value, _as_bytes(key))
    else:
        text = value or ""

    def bad(rule: str, error: str) -> Rejected:
        return Rejected(pos, key_safe, safe_text(text), rule, safe_text(error), _as_bytes(value), _as_bytes(key))

    try:
        obj = loads(text, constants=True)  # a leading byte order mark is ignored
    except JSONProblem as exc:
        return bad(exc.rule, f"value is not JSON: {exc.message}" if exc.rule == "invalid_json" else exc.message)
    if not isinstance(obj, dict):
        return bad("not_an_object", "value must be a JSON object")
    rid = obj.get("record_id")
    if not isinstance(rid, str) or not rid.strip():
        return bad("bad_record_id", "record_id must be a non-empty string")
    if len(rid) > MAX_ID_CHARS:
        return bad("id_too_long", f"record_id is {len(rid)} characters; at most {MAX_ID_CHARS}")
    if not is_utf8(rid):
        return bad("invalid_unicode", f"record_id {show(rid)} holds a lone surrogate, which is not valid Unicode")
    if key_s is not None and key_s != "" and key_s != rid:
        return bad("key_mismatch", f"message key {show(key_s)} differs from record_id {show(rid)}")
    label = obj.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        return bad("bad_label", "label must be a string (or integer)")
    if isinstance(label, int) and not -(1 << 63) <= label < (1 << 63):
        return bad("bad_label", f"label {show(label)} is an integer outside the signed 64-bit range")
    if not is_utf8(label := str(label)):
        return bad("invalid_unicode", f"label {show(label)} holds a lone surrogate, which is not valid Unicode")
    if allowed_labels is not None and label not in allowed_labels:
        return bad("unknown_label", f"label {show(label)} is not one of {sorted(allowed_labels)}")
    source = obj.get("source", "unknown")
    if not isinstance(source, str) or not source.strip():
        return bad("bad_source", "source must be a non-empty string")
    if not is_utf8(source):
        return bad("invalid_unicode", f"source {show(source)} holds a lone surrogate, which is not valid Unicode")
    conf = obj.get("confidence", 1.0)
    if isinstance(conf, bool) or not isinstance(conf, (int, float)):
        return bad("bad_confidence", "confidence must be a number")
    try:
        conf_f = float(conf)  # a 400-digit integer overflows a double
    except OverflowError:
        return bad("confidence_out_of_range", f"confidence {show(conf)} is outside 0..1")
    if not math.isfinite(conf_f):
        return bad("bad_confidence", "confidence must be a number")
    if not 0.0 <= conf_f <= 1.0:
        return bad("confidence_out_of_range", f"confidence {show(conf)} is outside 0..1")
    try:
        ts = parse_event_time(obj.get("ts"), "ts")
    except TimeOutOfRange as exc:
        return bad("ts_out_of_range", str(exc))
    except ValueError as exc:
        return bad("bad_ts", str(exc))
    return Event(pos, rid, label, source, conf_f, ts)


def _position_columns(items) -> dict:
    """The (topic, partition, offset) columns of events or rejects, typed as their tables are."""
    return {"topic": [x.pos.topic for x in items],
            "partition": np.array([x.pos.partition for x in items], dtype=np.int32),
            "offset": np.array([x.pos.offset for x in items], dtype=np.int64)}


def write(store: Store, events: list[Event], rejects: list[Rejected], source_kind: str,
          dlq_topic: str | None = None) -> tuple[int, int]:
    """Insert events and rejects in one transaction, idempotently; returns (new events, new rejects).

    Rejects keep the original bytes (``raw_bytes``, ``key_bytes``); with a ``dlq_topic`` they
    are recorded ``dlq_status = 'pending'`` and dead-lettered afterwards (:func:`mark_dlq`)."""
    now = pd.Timestamp.now(tz="UTC")
    new_events = new_rejects = 0  # what the statements inserted (a row seen before is not new)
    with store.transaction(scope="feedback") as con:
        if events:
            from .ingest import _erased

            erased = _erased(con)
            if erased is not None:  # a vote for an erased record: a tombstone at its offset, no payload
                events = [Event(e.pos, "", "", "", 0.0, e.ts) if erased(e.record_id) else e for e in events]
            df = pd.DataFrame({
                **_position_columns(events),
                "record_id": [e.record_id for e in events],
                "label": [e.label for e in events],
                "source": [e.source for e in events],
                "confidence": np.array([e.confidence for e in events], dtype=np.float64),
                "ts": pd.to_datetime([e.ts for e in events], utc=True),
                "source_kind": source_kind,
                "ingested_at": now,
            })
            con.register("fb_chunk", df)
            new_events = con.execute(
                "INSERT INTO feedback_events SELECT * FROM fb_chunk ON CONFLICT DO NOTHING").fetchall()[0][0]
            con.unregister("fb_chunk")
        if rejects:  # one statement, however many (a poisoned topic can send thousands)
            con.register("fb_rejects", pd.DataFrame({
                **_position_columns(rejects),
                "msg_key": [r.key for r in rejects],
                "raw": [r.raw for r in rejects],
                "rule": [r.rule for r in rejects],
                "error": [r.error for r in rejects],
                "source_kind": source_kind,
                "dlq_topic": dlq_topic,
                "rejected_at": now,
                "raw_bytes": [r.raw_bytes for r in rejects],
                "key_bytes": [r.key_bytes for r in rejects],
                "dlq_status": "pending" if dlq_topic else None,
            }))
            new_rejects = con.execute(
                """INSERT INTO feedback_rejects (topic, "partition", "offset", msg_key, raw, rule, error,
                       source_kind, dlq_topic, rejected_at, raw_bytes, key_bytes, dlq_status)
                   SELECT topic, "partition", "offset", msg_key, raw, rule, error, source_kind, dlq_topic,
                          rejected_at, CAST(raw_bytes AS BLOB), CAST(key_bytes AS BLOB), dlq_status
                   FROM fb_rejects ON CONFLICT DO NOTHING""").fetchall()[0][0]
            con.unregister("fb_rejects")
    return int(new_events), int(new_rejects)


def known_rejects(store: Store, topic: str, partition: int, start: int, end: int) -> dict[int, str | None]:
    """The range's recorded rejects: offset -> dlq_status (``pending``, ``sent``, ``reference``,
    ``failed: <reason>``; NULL for rows recorded before the DLQ status was tracked)."""
    with store.connect() as con:
        return dict(con.execute(
            """SELECT "offset", dlq_status FROM feedback_rejects WHERE topic = ? AND "partition" = ?
               AND "offset" BETWEEN ? AND ?""", [topic, partition, start, end]).fetchall())


def dlq_due(status: str | None) -> bool:
    """A reject still to dead-letter: recorded but not (successfully) sent yet."""
    return status is not None and (status == "pending" or status.startswith("failed"))


def mark_dlq(store: Store, topic: str, partition: int, statuses: dict[int, str]) -> None:
    """Record the dead-letter outcome per offset (``sent`` | ``reference`` | ``failed: ...``)."""
    if not statuses:
        return
    df = pd.DataFrame({"offset": np.array(list(statuses), dtype=np.int64),
                       "dlq_status": [str(v) for v in statuses.values()]})
    with store.transaction(scope="feedback") as con:
        con.register("dlq_marks", df)
        con.execute("""UPDATE feedback_rejects SET dlq_status = m.dlq_status FROM dlq_marks m
                       WHERE feedback_rejects.topic = ? AND feedback_rejects."partition" = ?
                         AND feedback_rejects."offset" = m."offset" """, [topic, partition])
        con.unregister("dlq_marks")


# ------------------------------------------------------------------------------ consensus


@dataclass
class ConsensusResult:
    labels: pd.DataFrame
    reliability: pd.DataFrame


def consensus(votes: pd.DataFrame, existing_records: Iterable[str], cfg: ConsensusConfig,
              now: datetime | None = None) -> ConsensusResult:
    """Weighted vote per record: reliability x confidence x temporal decay.

    ``votes`` has record_id, label, source, confidence, ts, offset. A reviewer who changes
    their mind is counted once, with their latest vote. Reliability is re-estimated from
    agreement with the (non-conflicting) consensus, a few fixed-point iterations from the
    prior, so a reviewer who keeps disagreeing with everyone else loses weight.
    """
    now = now or datetime.now(timezone.utc)
    cols = ["record_id", "label", "weight", "margin", "n_votes", "n_reviewers", "conflict", "status",
            "resolved_at", "last_vote_at"]
    if votes.empty:
        return ConsensusResult(pd.DataFrame(columns=cols),
                               pd.DataFrame(columns=["source", "reliability", "n_votes", "n_scored", "n_agree"]))
    v = votes.sort_values(["ts", "topic", "partition", "offset"]) if "topic" in votes else votes.sort_values("ts")
    n_votes = v.groupby("record_id").size()
    v = v.drop_duplicates(["record_id", "source"], keep="last").copy()
    newest = v.groupby("record_id")["ts"].transform("max")
    age_h = (newest - v["ts"]).dt.total_seconds() / 3600.0
    v["base"] = v["confidence"] * np.power(0.5, age_h / cfg.half_life_hours)
    prior = cfg.prior_agree / (cfg.prior_agree + cfg.prior_disagree)
    rel = pd.Series(prior, index=v["source"].unique())
    for _ in range(cfg.iterations):
        v["w"] = v["base"] * v["source"].map(rel)
        scores = v.groupby(["record_id", "label"])["w"].sum().unstack(fill_value=0.0)
        top = scores.max(axis=1)
        total = scores.sum(axis=1)
        ranked = np.sort(scores.to_numpy(), axis=1)
        second = pd.Series(ranked[:, -2] if ranked.shape[1] > 1 else 0.0, index=scores.index)
        margin = ((top - second) / total.where(total > 0, 1.0)).fillna(0.0)
        winner = scores.idxmax(axis=1)
        conflict = margin < cfg.conflict_margin
        scored = v[~v["record_id"].map(conflict)]
        agree = (scored["label"] == scored["record_id"].map(winner)).groupby(scored["source"]).sum()
        n_scored = scored.groupby("source").size()
        rel = ((agree.reindex(rel.index, fill_value=0) + cfg.prior_agree)
               / (n_scored.reindex(rel.index, fill_value=0) + cfg.prior_agree + cfg.prior_disagree))
    exists = set(existing_records)
    out = pd.DataFrame({
        "record_id": scores.index,
        "label": winner.values,
        "weight": (top / total.where(total > 0, 1.0)).values,
        "margin": margin.values,
        "n_votes": n_votes.reindex(scores.index).values.astype(int),
        "n_reviewers": v.groupby("record_id")["source"].nunique().reindex(scores.index).values.astype(int),
        "conflict": conflict.values,
    })
    out["last_vote_at"] = v.groupby("record_id")["ts"].max().reindex(scores.index).values
    present = out["record_id"].isin(exists)
    out["status"] = np.where(~present, "pending", np.where(out["conflict"], "conflict", "resolved"))
    out["resolved_at"] = pd.Series(pd.Timestamp(now), index=out.index).where(present, pd.NaT)
    reliability = pd.DataFrame({
        "source": rel.index,
        "reliability": rel.values,
        "n_votes": v.groupby("source").size().reindex(rel.index, fill_value=0).values,
        "n_scored": n_scored.reindex(rel.index, fill_value=0).values,
        "n_agree": agree.reindex(rel.index, fill_value=0).values,
    })
    return ConsensusResult(out[cols], reliability)


def _keep_resolved_at(labels: pd.DataFrame, before: pd.DataFrame) -> None:
    """A label that was already what it is keeps the time it became so (``resolved_at``):
    the labels are recomputed from every vote each time, but when a label became known is
    the order the model learns in (learning.models: the latest labels are the freshest)."""
    if not len(labels) or not len(before):
        return
    old = before.set_index("record_id")
    same = labels["record_id"].map(old["label"]).eq(labels["label"]) & \
        labels["record_id"].map(old["status"]).eq(labels["status"]) & labels["resolved_at"].notna()
    prior = pd.to_datetime(labels["record_id"].map(old["resolved_at"]), utc=True)
    labels.loc[same & prior.notna(), "resolved_at"] = prior[same & prior.notna()]


def resolve_labels(store: Store, cfg: ConsensusConfig) -> dict[str, int]:
    """Recompute ``labels`` and ``reviewer_reliability`` from all feedback (idempotent)."""
    with store.connect() as con:
        # record_id '': a tombstone (the vote of an erased record), kept for its offset only
        votes = con.execute("""SELECT topic, "partition", "offset", record_id, label, source, confidence, ts
                               FROM feedback_events WHERE record_id <> ''""").df()
        existing = [r[0] for r in con.execute(
            "SELECT DISTINCT f.record_id FROM feedback_events f JOIN records r ON r.id = f.record_id").fetchall()]
        before = con.execute("SELECT record_id, label, status, resolved_at FROM labels").df()
    result = consensus(votes, existing, cfg)
    _keep_resolved_at(result.labels, before)
    now = pd.Timestamp.now(tz="UTC")
    with store.transaction() as con:
        con.execute("DELETE FROM labels")
        con.execute("DELETE FROM reviewer_reliability")
        if len(result.labels):
            con.register("lab", result.labels)
            con.execute("INSERT INTO labels SELECT * FROM lab")
            rel = result.reliability.assign(updated_at=now)
            con.register("rel", rel)
            con.execute("INSERT INTO reviewer_reliability SELECT * FROM rel")
    lab = result.labels
    digest = hashlib.sha256(lab.sort_values("record_id")[["record_id", "label", "status"]]
                            .to_csv(index=False).encode()).hexdigest()[:16] if len(lab) else "empty"
    return {
        "data_version": digest,
        "labels": int(len(lab)),
        "resolved": int((lab["status"] == "resolved").sum()) if len(lab) else 0,
        "conflict": int((lab["status"] == "conflict").sum()) if len(lab) else 0,
        "pending": int((lab["status"] == "pending").sum()) if len(lab) else 0,
        "reviewers": int(len(result.reliability)),
    }
