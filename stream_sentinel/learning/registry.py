"""The model registry: immutable version folders, one champion pointer, an audit trail.

    models/m000003/model.txt       LightGBM's own text format (no pickle)
    models/m000003/features.*      the feature pipeline the trees were trained on
    models/m000003/meta.json       parent, training-set data version, params, metrics, sha256
    models/CHAMPION                -> "m000003", switched with os.replace
    models/CHALLENGER              -> "m000004" while an A/B test runs (absent otherwise)

The pointer is the source of truth for which version serves. ``model_versions`` in
DuckDB mirrors it; :meth:`ModelRegistry.reconcile` repairs the mirror after a crash
between the two writes, so there is always exactly one consistent champion.

``CHALLENGER`` is the same for an A/B test's challenger: the source of truth, switched
first, with ``model_versions`` following, so that a server tells by a ``stat`` per request,
without the database (a run may hold it for minutes), which version may answer the
challenger's share. A retired, promoted or tainted (erased-data) challenger stops answering
the moment its pointer goes; a crash before the status follows is repaired by
:meth:`reconcile` from the pointer, as for the champion, and never points at a version that
is tainted or is the champion.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..atomic import fsync_path, pause_point, write_bytes_atomic
from .models import FeatureSpec, file_sha256
from ..store import Store

POINTER = "CHAMPION"
CHALLENGER_POINTER = "CHALLENGER"


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Version:
    version: str
    semver: str
    parent_version: str | None
    status: str
    strategy: str
    params: dict
    metrics: dict
    training_samples: int
    training_set_version: str
    embedding_model_id: str
    path: str
    sha256: str
    created_at: Any
    promoted_at: Any
    promoted_score: float | None
    reason: str | None
    tainted_by: str | None = None  # the erasure whose record it was trained on: never served

    def as_json(self) -> dict:
        d = dict(self.__dict__)
        d["parent"] = d["parent_version"]
        for k in ("created_at", "promoted_at"):
            d[k] = d[k].isoformat() if d[k] is not None else None
        return d


class TaintedVersion(ValueError):
    """A version trained on an erased record cannot serve."""


class ModelRegistry:
    def __init__(self, root: Path, store: Store):
        self.root = Path(root)
        self.store = store

    # --------------------------------------------------------------- reading
    def champion_version(self) -> str | None:
        try:
            return (self.root / POINTER).read_text().strip() or None
        except FileNotFoundError:
            return None

    def challenger_pointer(self) -> str | None:
        """The version ``CHALLENGER`` names: the one that may serve the challenger's share now."""
        try:
            return (self.root / CHALLENGER_POINTER).read_text().strip() or None
        except FileNotFoundError:
            return None

    def point_challenger(self, version: str | None) -> None:
        """``CHALLENGER`` names ``version`` (None: an empty file, no challenger; a server's ``stat``
        of a file that is always there costs no exception per request); the status is the
        caller's to change."""
        path = self.root / CHALLENGER_POINTER
        if version is None and not path.exists():
            return
        write_bytes_atomic(path, b"" if version is None else (version + "\n").encode())

    def get(self, version: str) -> Version | None:
        found = self._select("WHERE version = ?", [version])
        return found[0] if found else None

    def list(self) -> list[Version]:
        """Every version, in one read (the API's /v1/models: one connection, however many versions)."""
        return self._select("ORDER BY version", [])

    def _select(self, where: str, params: list) -> list[Version]:
        with self.store.connect() as con:
            rows = con.execute(f"SELECT * FROM model_versions {where}", params).fetchall()
            cols = [d[0] for d in con.description]
        out = []
        for row in rows:
            d = dict(zip(cols, row))
            d["params"] = json.loads(d["params"] or "{}")
            d["metrics"] = json.loads(d["metrics"] or "{}")
            out.append(Version(**d))
        return out

    def load(self, version: str):
        """(booster, feature spec) of a version, checked against its recorded sha256."""
        import lightgbm as lgb

        v = self.get(version)
        folder = self.root / version
        if v is not None and file_sha256(folder / "model.txt") != v.sha256:
            raise RuntimeError(f"model file of {version} does not match its recorded sha256")
        return lgb.Booster(model_file=str(folder / "model.txt")), FeatureSpec.load(folder)

    def load_folder(self, version: str) -> tuple[Any, FeatureSpec, dict]:
        """(booster, feature spec, meta.json) of a version from its folder alone, checked against
        the sha256 its meta.json recorded: what a server loads on a promotion without waiting
        for the database (a run may hold it for minutes)."""
        import lightgbm as lgb

        folder = self.root / version
        meta = json.loads((folder / "meta.json").read_text())
        if file_sha256(folder / "model.txt") != meta.get("sha256"):
            raise RuntimeError(f"model file of {version} does not match the sha256 in its meta.json")
        return lgb.Booster(model_file=str(folder / "model.txt")), FeatureSpec.load(folder), meta

    # --------------------------------------------------------------- writing
    def _next(self) -> str:
        nums = [int(p.name[1:]) for p in self.root.glob("m*") if p.is_dir() and p.name[1:].isdigit()]
        with self.store.connect() as con:
            nums += [int(r[0][1:]) for r in con.execute("SELECT version FROM model_versions").fetchall()]
        return f"m{(max(nums) + 1) if nums else 1:06d}"

    def _semver(self, parent: str | None, strategy: str) -> str:
        champ = self.get(parent) if parent else None
        if champ is None:
            return "1.0.0"
        major, minor, patch = (int(x) for x in champ.semver.split("."))
        return f"{major}.{minor + 1}.0" if strategy == "full" else f"{major}.{minor}.{patch + 1}"

    def save(self, booster, spec: FeatureSpec, *, parent: str | None, strategy: str, params: dict,
             metrics: dict, training_samples: int, training_set_version: str, embedding_model_id: str,
             labels: tuple[str, str] | None = None) -> Version:
        """Write a complete version folder (temp, fsync, rename) and register it as a candidate.
        ``labels``: (positive, negative) answers, kept in meta.json so a server can answer with
        the version's folder alone (see :func:`load_folder`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        version = self._next()
        tmp = self.root / f".tmp-{version}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        booster.save_model(str(tmp / "model.txt"))
        spec.save(tmp)
        sha = file_sha256(tmp / "model.txt")
        semver = self._semver(parent, strategy)
        meta = {"version": version, "semver": semver, "parent_version": parent, "strategy": strategy,
                "params": params, "metrics": metrics, "training_samples": training_samples,
                "training_set_version": training_set_version, "embedding_model_id": embedding_model_id,
                "sha256": sha, "created_at": _now().isoformat(),
                **({"labels": {"positive": labels[0], "negative": labels[1]}} if labels else {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        os.rename(tmp, self.root / version)
        fsync_path(self.root)
        with self.store.transaction() as con:
            con.execute(
                """INSERT INTO model_versions VALUES (?, ?, ?, 'candidate', ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL)""",
                [version, semver, parent, strategy, json.dumps(params), json.dumps(metrics), training_samples,
                 training_set_version, embedding_model_id, str(self.root / version), sha, _now()])
        return self.get(version)  # type: ignore[return-value]

    def event(self, event_type: str, model_version: str | None, *, batch_size: int | None = None,
              samples: int | None = None, before: dict | None = None, after: dict | None = None,
              improvement: float | None = None, duration_ms: float | None = None, **detail) -> None:
        with self.store.transaction() as con:
            con.execute(
                """INSERT INTO learning_events (event_type, model_version, batch_size, samples_processed,
                   metrics_before, metrics_after, improvement, duration_ms, detail, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [event_type, model_version, batch_size, samples, json.dumps(before) if before else None,
                 json.dumps(after) if after else None, improvement, duration_ms,
                 json.dumps(detail, default=str) if detail else None, _now()])

    def reject(self, version: str, reason: str) -> None:
        with self.store.transaction() as con:
            con.execute("UPDATE model_versions SET status = 'rejected', reason = ? WHERE version = ? "
                        "AND status = 'candidate'", [reason, version])

    def promote(self, version: str, score: float | None, reason: str, event_type: str = "promotion") -> None:
        """Make ``version`` the champion: pointer first (atomic), then the database mirror."""
        if not (self.root / version / "model.txt").exists():
            raise KeyError(f"no model version {version}")
        if self.store is not None:
            with self.store.connect() as con:
                taint = con.execute("SELECT tainted_by FROM model_versions WHERE version = ?", [version]).fetchall()
            if taint and taint[0][0]:
                raise TaintedVersion(f"{version} was trained on an erased record (erasure {taint[0][0]}): "
                                     "it is never served again")
        previous = self.champion_version()
        write_bytes_atomic(self.root / POINTER, (version + "\n").encode())
        if self.challenger_pointer() == version:  # the challenger won: it is no longer one
            self.point_challenger(None)
        pause_point("promotion_after_pointer")
        self._mirror(version, score, reason)
        self.event(event_type, version, previous_champion=previous, reason=reason)

    def _mirror(self, champion: str, score: float | None, reason: str | None) -> None:
        with self.store.transaction() as con:
            con.execute("UPDATE model_versions SET status = 'archived' WHERE status = 'champion' AND version <> ?",
                        [champion])
            # promoted_at = when it (last) started serving: live accuracy is judged from then on
            con.execute("""UPDATE model_versions SET status = 'champion', reason = coalesce(?, reason),
                           promoted_at = ?, promoted_score = coalesce(?, promoted_score)
                           WHERE version = ?""", [reason, _now(), score, champion])

    def challenger_version(self) -> str | None:
        """The challenger: the version ``CHALLENGER`` names (None: no A/B test runs)."""
        return self.challenger_pointer()

    def _tainted(self, version: str) -> str | None:
        with self.store.connect() as con:
            taint = con.execute("SELECT tainted_by FROM model_versions WHERE version = ?", [version]).fetchall()
        return taint[0][0] if taint else None

    def start_challenger(self, version: str, reason: str) -> None:
        """Serve ``version`` to the challenger share; any earlier challenger is retired."""
        if not (self.root / version / "model.txt").exists():
            raise KeyError(f"no model version {version}")
        if self._tainted(version):
            raise TaintedVersion(f"{version} was trained on an erased record: it is never served again")
        self.point_challenger(version)  # serves from now on (the earlier one stops)
        pause_point("challenger_after_pointer")
        self._mirror_challenger(version, reason)
        self.event("challenger", version, champion=self.champion_version(), reason=reason)

    def _mirror_challenger(self, version: str | None, reason: str | None) -> None:
        with self.store.transaction() as con:
            con.execute("UPDATE model_versions SET status = 'archived', reason = coalesce(?, reason) "
                        "WHERE status = 'challenger' AND version <> coalesce(?, '')",
                        ["replaced by a newer challenger" if version else None, version])
            if version is not None:
                con.execute("UPDATE model_versions SET status = 'challenger', reason = coalesce(?, reason), "
                            "promoted_at = CASE WHEN status = 'challenger' THEN promoted_at ELSE ? END "
                            "WHERE version = ?", [reason, _now(), version])

    def retire_challenger(self, version: str, reason: str) -> None:
        """End ``version``'s A/B test: its pointer goes first (it stops answering), then its status."""
        if self.challenger_pointer() == version:
            self.point_challenger(None)
        with self.store.transaction() as con:
            con.execute("UPDATE model_versions SET status = 'rejected', reason = ? WHERE version = ? "
                        "AND status = 'challenger'", [reason, version])

    def reconcile(self) -> str | None:
        """Repair the database mirror from the pointer (after a crash mid-promotion)."""
        champion = self.champion_version()
        with self.store.connect() as con:
            rows = [r[0] for r in con.execute("SELECT version FROM model_versions WHERE status='champion'").fetchall()]
        if champion is not None and rows != [champion]:
            self._mirror(champion, None, None)
        elif champion is None and rows:
            with self.store.transaction() as con:
                con.execute("UPDATE model_versions SET status = 'archived' WHERE status = 'champion'")
        challenger = self.challenger_pointer()
        if challenger is not None and (challenger == champion or self.get(challenger) is None
                                       or self._tainted(challenger)):
            self.point_challenger(None)  # promoted, unknown, or trained on an erased record
            challenger = None
        with self.store.connect() as con:
            rows = [r[0] for r in con.execute("SELECT version FROM model_versions WHERE status = 'challenger'"
                                              ).fetchall()]
        if rows != ([challenger] if challenger else []):  # a crash between a pointer and its status
            self._mirror_challenger(challenger, None)
        return champion

    def previous_champion(self, current: str) -> str | None:
        """The version that served last before ``current`` (rejected ones excluded)."""
        with self.store.connect() as con:
            rows = con.execute(
                """SELECT version FROM model_versions WHERE promoted_at IS NOT NULL AND version <> ?
                   AND status <> 'rejected' AND tainted_by IS NULL ORDER BY promoted_at DESC LIMIT 1""",
                [current]).fetchall()
        return rows[0][0] if rows else None

    def rollback(self, to: str | None = None) -> str:
        """Back to ``to`` or to the champion before the current one."""
        self.reconcile()
        current = self.champion_version()
        if to is None:
            to = self.previous_champion(current or "")
            if to is None:
                raise RuntimeError("no earlier champion to roll back to")
        if self.get(to) is None:
            raise KeyError(f"no model version {to}")
        self.promote(to, None, f"rollback from {current}", event_type="rollback")
        return to
