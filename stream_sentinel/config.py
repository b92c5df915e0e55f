"""Where Stream Sentinel keeps its data.

Everything lives under one data root so that a user can move, back up or delete a
deployment as a single folder. The root comes from ``STREAM_SENTINEL_HOME`` (default
``./.stream_sentinel``); nothing is chosen at import time, so tests and the Dagster
resources can point at another root without reloading modules.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

HOME_ENV = "STREAM_SENTINEL_HOME"
DEFAULT_HOME = ".stream_sentinel"
PARTITIONS_START_ENV = "STREAM_SENTINEL_PARTITIONS_START"
# The first partition of a data root made before its first day was recorded: the calendar
# such roots were built with, so none of their partitions disappears.
LEGACY_PARTITIONS_START = "2024-01-01"
# a file whose end looks unfinished is given this long (since its last change) to be completed
SETTLE_ENV = "STREAM_SENTINEL_SETTLE_SECONDS"
DEFAULT_SETTLE_S = 60.0
# DuckDB's memory limit while a file is written: its buffer pool and checkpoints otherwise
# grow with the file (bench/ingest_memory.py)
DB_MEMORY_ENV = "STREAM_SENTINEL_INGEST_DB_MEMORY"
DEFAULT_DB_MEMORY = "64MB"
_MEMORY_SIZE = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)", re.IGNORECASE)


def memory_limit(value: str) -> str | None:
    """A DuckDB memory limit as configured: the size (``64MB``, ``1GiB``), or None for ``off``
    (DuckDB's own default, 80 % of RAM); ``""`` is the default. Raises SettingError naming the variable."""
    want = value.strip() or DEFAULT_DB_MEMORY
    if want.lower() in ("0", "off", "none"):
        return None
    if not _MEMORY_SIZE.fullmatch(want):
        raise SettingError(f"{DB_MEMORY_ENV}={value!r} is not a size such as 64MB or 1GiB, or off")
    return want


def home_from_env() -> Path:
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().absolute()


@dataclass(frozen=True)
class Paths:
    """The layout of a data root; ``ensure()`` creates it."""

    home: Path

    @classmethod
    def from_env(cls) -> "Paths":
        return cls(home_from_env())

    @classmethod
    def at(cls, home: str | os.PathLike[str]) -> "Paths":
        return cls(Path(home).expanduser().absolute())

    @property
    def raw(self) -> Path:
        return self.home / "raw"

    @property
    def failed(self) -> Path:
        return self.home / "failed"

    @property
    def index(self) -> Path:
        return self.home / "index"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def embedding_models(self) -> Path:
        """Derived embedding models (ONNX exports, int8 variants), one folder per source model."""
        return self.models / "embedding"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def feedback(self) -> Path:
        return self.home / "feedback"

    @property
    def db(self) -> Path:
        return self.home / "metrics.duckdb"

    @property
    def embed_socket(self) -> Path:
        """Where `stream-sentinel embed-server` listens (see stream_sentinel.embedding.server)."""
        return self.home / "embedder.sock"

    @property
    def first_day_file(self) -> Path:
        """The UTC day the data root was made (``YYYY-MM-DD``): where its daily partitions start."""
        return self.home / "first_day"

    def first_day(self, today: date | None = None) -> str:
        """The first arrival day this data root can have, so the daily partitions start there.

        Files are partitioned by the day they arrive, and nothing arrives before the root
        exists: starting the calendar on that day shows a new user's first day as the only
        partition, instead of years of "missing" days before it. Read, never written, here
        (the code location calls this when it loads); ``ensure()`` records it. A root made
        before the day was recorded (it has a database already) keeps the old 2024-01-01
        start; a root that does not exist yet starts today.
        """
        try:
            return date.fromisoformat(self.first_day_file.read_text().strip()).isoformat()
        except FileNotFoundError:
            pass
        except ValueError:
            raise ValueError(f"{self.first_day_file} does not hold a YYYY-MM-DD day; set {PARTITIONS_START_ENV} "
                             "or delete the file (the data root's first day is then today)") from None
        if self.db.exists():
            return LEGACY_PARTITIONS_START
        return (today or datetime.now(timezone.utc).date()).isoformat()

    def note_arrival(self, day: date) -> None:
        """Move the recorded first day back to ``day`` if it is earlier.

        Only files registered with a fixed, past arrival time (tests, backfill demos) arrive
        before the root was made; their days must be partitions too. The code location sees
        the new first day when it loads next."""
        if day.isoformat() < self.first_day():
            from .atomic import write_bytes_atomic

            self.home.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.first_day_file, (day.isoformat() + "\n").encode())

    def ensure(self) -> "Paths":
        for p in (self.raw, self.failed, self.index, self.models, self.reports, self.feedback):
            p.mkdir(parents=True, exist_ok=True)
        if not self.first_day_file.exists():
            from .atomic import write_bytes_atomic

            write_bytes_atomic(self.first_day_file, (self.first_day() + "\n").encode())
        return self


def cache_root() -> Path:
    """Where downloads and derived files shared by every data root live (the demo corpus, the
    Kafka jars, precomputed test vectors): ``$STREAM_SENTINEL_CACHE``, else the XDG cache."""
    base = os.environ.get("STREAM_SENTINEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "stream-sentinel")
    return Path(base)


def env_num(name: str, default: float, cast=float):
    raw = os.environ.get(name)
    if raw in (None, ""):
        return cast(default)
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


class SettingError(ValueError):
    """A setting broke its rule; the message names the environment variable and the field."""


def setting(default, env: str, help: str, group: str | None, *, low: float | None = None,
            high: float | None = None, blank: bool = False):
    """A tunable: its default, the variable that overrides it, what it does, and where it shows.

    One declaration feeds everything that reads settings: ``from_env`` (the CLI and the code
    location), the typed fields of the Dagster resources (their group is the resource's
    sub-section; ``None``: read once when the code location loads, like the sensor interval),
    and the README's table. ``low``/``high`` bound numbers (inclusive); ``blank``: an empty
    string is a value (``labels=`` accepts any label), not "unset".
    """
    return field(default=default, metadata={"env": env, "help": help, "group": group, "low": low,
                                            "high": high, "blank": blank})


def setting_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """The fields of a settings dataclass declared with :func:`setting`, with their resolved types."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "env" in f.metadata]


def _parse(raw: str, tp, var: str):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _parse(raw, args[0], var)
    if typing.get_origin(tp) is typing.Literal:
        return raw  # checked with the other rules in check_settings
    if tp is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise SettingError(f"{var}={raw!r} is not a boolean (1/0, true/false, yes/no, on/off)")
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            raise SettingError(f"{var}={raw!r} is not {'an integer' if tp is int else 'a number'}") from None
    return raw


def env_values(cls, environ: typing.Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings the environment sets (parsed by type, errors naming the variable); unset
    variables are left out, so the dataclass defaults apply."""
    environ = os.environ if environ is None else environ
    out = {}
    for f, tp in setting_fields(cls):
        raw = environ.get(f.metadata["env"])
        if raw is None or (raw.strip() == "" and not f.metadata["blank"]):
            continue
        out[f.name] = _parse(raw.strip() if not f.metadata["blank"] else raw, tp, f.metadata["env"])
    return out


def check_settings(obj) -> None:
    """Every rule a settings dataclass declares: allowed values, types and bounds.

    Runs on construction (``__post_init__``), so a value that came from the environment, from
    the Dagster launchpad or from code is refused the same way, naming the variable."""
    for f, tp in setting_fields(type(obj)):
        value, var = getattr(obj, f.name), f"{f.metadata['env']} ({f.name})"
        if value is None and type(None) in typing.get_args(tp):
            continue
        base = [a for a in typing.get_args(tp) if a is not type(None)][0] \
            if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
        if typing.get_origin(base) is typing.Literal:
            if value not in typing.get_args(base):
                raise SettingError(f"{var} = {value!r} is not one of "
                                   f"{', '.join(map(str, typing.get_args(base)))}")
            continue
        if base in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SettingError(f"{var} = {value!r} is not a number")
        if base is int and not float(value).is_integer():
            raise SettingError(f"{var} = {value!r} is not an integer")
        low, high = f.metadata["low"], f.metadata["high"]
        if low is not None and value < low or high is not None and value > high:
            bounds = (f"between {low:g} and {high:g}" if low is not None and high is not None
                      else f"at least {low:g}" if low is not None else f"at most {high:g}")
            raise SettingError(f"{var} = {value!r} must be {bounds}")


def _label_pair(labels: str, positive: str, negative: str) -> tuple[str, str]:
    """The two classes the model learns, named as the labels say them.

    The model is binary: it scores ``positive`` and answers the other configured label
    otherwise (never an invented ``not_<positive>``: live accuracy, drift and the API
    compare answers with feedback labels as strings). With ``labels=a,b`` and nothing
    else set, ``b`` is the positive class (as ``spam`` is for the default ``ham,spam``).
    """
    names = list(dict.fromkeys(v.strip() for v in labels.split(",") if v.strip()))
    positive, negative = positive.strip(), negative.strip()
    if names:
        if len(names) != 2:
            raise SettingError(f"STREAM_SENTINEL_LABELS={labels!r}: the model learns two classes; "
                               f"name exactly two labels (e.g. ham,spam), or none to accept any")
        positive = positive or names[1]
        if positive not in names:
            raise SettingError(f"STREAM_SENTINEL_POSITIVE_LABEL={positive!r} is not one of "
                               f"STREAM_SENTINEL_LABELS={labels!r}")
        other = names[0] if positive == names[1] else names[1]
        if negative and negative != other:
            raise SettingError(f"STREAM_SENTINEL_NEGATIVE_LABEL={negative!r} must be the other label of "
                               f"STREAM_SENTINEL_LABELS={labels!r} ({other!r})")
        return positive, other
    if not positive:
        positive = "spam"
    if negative == positive:
        raise SettingError("STREAM_SENTINEL_NEGATIVE_LABEL must differ from STREAM_SENTINEL_POSITIVE_LABEL")
    # any label accepted: the negative class is named by the data when not set (learning.label_pair)
    return positive, negative


_S = "STREAM_SENTINEL_"


@dataclass(frozen=True)
class Settings:
    """Every tunable: a default, the environment variable that overrides it (README table),
    and its place among the Dagster resources' fields. Constructing one checks every rule, so
    an instance is always valid; the label pair is resolved from ``labels`` on construction."""

    # read once when the code location loads (sensor definitions and the partition calendar)
    sensor_interval_s: int = setting(5, _S + "SENSOR_INTERVAL", "seconds between sensor ticks", None, low=1)
    partitions_start: str = setting("", PARTITIONS_START_ENV, "first daily partition (YYYY-MM-DD); "
                                    "empty: the data root's first day", None)
    # ingest
    debounce_s: float = setting(2.0, _S + "DEBOUNCE_SECONDS", "a file unchanged this long counts as "
                                "written", "ingest", low=0)
    batch_max_files: int = setting(100, _S + "BATCH_MAX_FILES", "files per micro-batch run", "ingest", low=1)
    batch_max_records: int = setting(5000, _S + "BATCH_MAX_RECORDS", "records per micro-batch run", "ingest",
                                     low=1)
    settle_s: float = setting(DEFAULT_SETTLE_S, SETTLE_ENV, "a file whose end looks unfinished waits this "
                              "long for its writer before the end is judged", "ingest", low=0)
    ingest_db_memory: str = setting(DEFAULT_DB_MEMORY, DB_MEMORY_ENV, "DuckDB memory limit while a file is "
                                    "written (e.g. 64MB, 1GiB; off: DuckDB's default)", "ingest")
    # vector index
    rebuild_ratio: float = setting(0.2, _S + "REBUILD_RATIO", "rebuild the index when this share of its "
                                   "vectors is new or deleted", "index", low=0)
    keep_backups: int = setting(3, _S + "KEEP_BACKUPS", "index versions kept behind CURRENT", "index", low=0)
    ivf_threshold: int = setting(100_000, _S + "INDEX_IVF_THRESHOLD", "a rebuild past this many vectors "
                                 "makes an IVF index instead of exact search (exact: 11 ms per query at 100k "
                                 "on one core, IVF 0.1 ms, bench/faiss_search.py)", "index", low=1)
    nprobe: int = setting(8, _S + "INDEX_NPROBE", "IVF lists searched per query (at 1M: recall@10 0.998, "
                          "p99 0.88 ms, bench/faiss_search.py)", "index", low=1)
    # embedding (the embedder resource)
    model_path: str | None = setting(None, _S + "MODEL_PATH", "sentence-transformers model folder; "
                                     "empty: the bundled all-MiniLM-L6-v2", "embedding")
    device: str = setting("cpu", _S + "DEVICE", "torch device (cpu, cuda)", "embedding")
    embed_batch_size: int = setting(16, _S + "EMBED_BATCH_SIZE", "texts per forward pass", "embedding", low=1)
    embed_precision: typing.Literal["auto", "fp32", "bf16"] = setting(
        "auto", _S + "EMBED_PRECISION", "auto: bf16 on CPUs with bf16 units, else fp32", "embedding")
    embed_backend: typing.Literal["torch", "onnx", "onnx-int8"] = setting(
        "torch", _S + "EMBED_BACKEND", "torch, or onnxruntime (the onnx extra)", "embedding")
    embed_compile: bool = setting(True, _S + "EMBED_COMPILE", "the embedding server compiles the model at "
                                  "start (embedding/encoder.py)", "embedding")
    embed_pin_threads: bool = setting(True, _S + "EMBED_PIN_THREADS", "the embedding server and the API pin "
                                      "the compiled model's thread and its OpenMP workers one per CPU "
                                      "(openmp.py)", "embedding")
    # feedback and labels
    feedback_topic: str = setting("stream-sentinel.feedback", _S + "FEEDBACK_TOPIC", "Kafka topic of label "
                                  "feedback", "feedback")
    erasure_topic: str = setting("stream-sentinel.erasures", _S + "ERASURE_TOPIC", "Kafka topic of erasure "
                                 "requests ({record_id, reason}), read by erasure_sensor when Kafka is configured",
                                 "feedback")
    labels: str = setting("ham,spam", _S + "LABELS", "the two allowed labels, comma-separated; empty: any "
                          "string", "feedback", blank=True)
    # as configured; the resolved pair is positive_label / negative_label
    positive: str = setting("", _S + "POSITIVE_LABEL", "the class the model scores; empty: the second of "
                            "labels", "feedback")
    negative: str = setting("", _S + "NEGATIVE_LABEL", "the other class; empty: the other of labels",
                            "feedback")
    feedback_min_batch: int = setting(10, _S + "FEEDBACK_BATCH", "messages that make a feedback run",
                                      "feedback", low=1)
    feedback_max_wait_s: float = setting(30.0, _S + "FEEDBACK_TIMEOUT_SECONDS", "fewer messages run after "
                                         "this wait", "feedback", low=0)
    feedback_max_range: int = setting(50_000, _S + "FEEDBACK_MAX_RANGE", "messages per feedback run at "
                                      "most", "feedback", low=1)
    consensus_half_life_h: float = setting(168.0, _S + "CONSENSUS_HALF_LIFE_HOURS", "a vote this much older "
                                           "than the record's newest vote counts half", "feedback", low=0.01)
    consensus_conflict_margin: float = setting(0.2, _S + "CONFLICT_MARGIN", "(top - runner-up) / total "
                                               "below this: conflict, held out", "feedback", low=0, high=1)
    reliability_prior: str = setting("2,1", _S + "RELIABILITY_PRIOR", "Beta(agree, disagree) prior on each "
                                     "reviewer's reliability", "feedback")
    # learning
    valid_share: float = setting(0.2, _S + "VALID_SHARE", "share of labels held out for the gate",
                                 "learning", low=0, high=0.9)
    golden_share: float = setting(0.1, _S + "GOLDEN_SHARE", "share held out for good (golden slice)",
                                  "learning", low=0, high=0.9)
    valid_max: int = setting(200, _S + "VALID_MAX", "validation rows at most", "learning", low=1)
    promotion_metric: typing.Literal["roc_auc", "f1", "log_loss"] = setting(
        "roc_auc", _S + "PROMOTION_METRIC", "what the gate compares", "learning")
    promotion_margin: float = setting(0.01, _S + "PROMOTION_MARGIN", "a candidate must beat the champion "
                                      "by this much", "learning", low=0)
    retrain_min_labels: int = setting(50, _S + "RETRAIN_MIN_LABELS", "new labels that trigger training",
                                      "learning", low=1)
    retrain_growth: float = setting(0.25, _S + "RETRAIN_GROWTH", "... and this share of the labels the "
                                    "newest training set has", "learning", low=0)
    retrain_max_wait_s: float = setting(600.0, _S + "RETRAIN_MAX_WAIT_SECONDS", "fewer new labels train "
                                        "after this wait", "learning", low=0)
    replay_size: int = setting(500, _S + "REPLAY_SIZE", "old labels replayed with the new ones",
                               "learning", low=0)
    rescore_window: int = setting(10_000, _S + "RESCORE_WINDOW", "a new champion rescores this many "
                                  "latest records (new ones always)", "learning", low=0)
    rollback_margin: float = setting(0.05, _S + "ROLLBACK_MARGIN", "live accuracy this far under the "
                                     "promised one: automatic rollback", "learning", low=0, high=1)
    rollback_min_samples: int = setting(50, _S + "ROLLBACK_MIN_SAMPLES", "labels before live accuracy "
                                        "counts", "learning", low=1)
    # A/B
    ab_share: float = setting(0.0, _S + "AB_SHARE", "> 0: a candidate that passes the gate becomes a "
                              "challenger serving this share", "ab", low=0, high=1)
    ab_routing: typing.Literal["hash", "thompson"] = setting(
        "hash", _S + "AB_ROUTING", "hash (consistent hashing of record id) or thompson", "ab")
    ab_alpha: float = setting(0.05, _S + "AB_ALPHA", "significance of the A/B decision", "ab", low=0, high=1)
    ab_min_samples: int = setting(100, _S + "AB_MIN_SAMPLES", "labelled answers per arm before deciding",
                                  "ab", low=1)
    erasure_tainted_models: typing.Literal["delete", "keep"] = setting(
        "delete", _S + "ERASURE_TAINTED_MODELS", "model versions trained on an erased record: delete their "
        "files, or keep them (marked tainted: never served, promoted or rolled back to)", "learning")
    # retries
    retry_max_attempts: int = setting(4, _S + "RETRY_MAX_ATTEMPTS", "failed runs of a unit (batch, range, "
                                      "feedback file) before it is parked", "retry", low=1)
    retry_base_delay_s: float = setting(20.0, _S + "RETRY_BASE_SECONDS", "backoff after the first failed "
                                        "run; doubles, up to 5 min", "retry", low=0)
    retry_parked_s: float = setting(900.0, _S + "RETRY_PARKED_SECONDS", "a parked unit is still tried "
                                    "this often", "retry", low=0)
    # the HTTP API (`stream-sentinel serve`)
    api_host: str = setting("127.0.0.1", _S + "API_HOST", "address `serve` listens on (127.0.0.1: this "
                            "machine only; 0.0.0.0: every interface)", "serving")
    api_port: int = setting(8765, _S + "API_PORT", "port `serve` listens on", "serving", low=1, high=65535)
    api_url: str = setting("", _S + "API_URL", "the API's address as users reach it, for links in the "
                           "Dagster UI (behind a proxy); empty: http://<host>:<port>", "serving")
    api_max_body_bytes: int = setting(10_000_000, _S + "API_MAX_BODY_BYTES", "largest request body (bytes)",
                                      "serving", low=1)
    api_max_items: int = setting(1000, _S + "API_MAX_ITEMS", "most records or feedback messages per request",
                                 "serving", low=1)
    api_batch_window_ms: float = setting(
        0.0, _S + "API_BATCH_WINDOW_MS", "dynamic batching: texts that queued while the embedder was busy are "
        "always embedded together; > 0 also holds the first text of an idle spell this long for others", "serving",
        low=0.0, high=1000.0)
    api_timeout_s: float = setting(
        30.0, _S + "API_TIMEOUT_SECONDS", "longest a request waits for the embedder, the models or Kafka; then it "
        "is answered 503 with Retry-After (never left hanging: a stopped embedding server or broker costs each "
        "request at most this)", "serving", low=0.1, high=3600.0)
    api_max_queued_texts: int = setting(
        10_000, _S + "API_MAX_QUEUED_TEXTS", "texts that may wait for the embedder; a request past it is refused "
        "at once (503 overloaded, Retry-After) instead of queueing into a timeout", "serving", low=1)
    api_batch_max: int = setting(64, _S + "API_BATCH_MAX", "dynamic batching: most texts embedded in one call "
                                 "(1: batching off, each request embedded on its own)", "serving", low=1, high=4096)

    def __post_init__(self) -> None:
        check_settings(self)
        object.__setattr__(self, "_pair", _label_pair(self.labels, self.positive, self.negative))
        try:
            agree, disagree = (float(x) for x in self.reliability_prior.split(","))
            assert agree > 0 and disagree > 0
        except (ValueError, AssertionError):
            raise SettingError(f"{_S}RELIABILITY_PRIOR (reliability_prior) = {self.reliability_prior!r} is not "
                               "two positive numbers 'agree,disagree' (e.g. 2,1)") from None
        if self.partitions_start:
            try:
                date.fromisoformat(self.partitions_start)
            except ValueError:
                raise SettingError(f"{PARTITIONS_START_ENV}={self.partitions_start!r} is not a day "
                                   "(YYYY-MM-DD)") from None
        memory_limit(self.ingest_db_memory)
        if not self.feedback_topic.strip():
            raise SettingError(f"{_S}FEEDBACK_TOPIC (feedback_topic) is empty")
        if self.valid_share + self.golden_share >= 1:
            raise SettingError(f"{_S}VALID_SHARE + {_S}GOLDEN_SHARE = {self.valid_share + self.golden_share:g}: "
                               "nothing would be left to train on")

    @classmethod
    def from_env(cls, environ: typing.Mapping[str, str] | None = None) -> "Settings":
        return cls(**env_values(cls, environ))

    @property
    def positive_label(self) -> str:
        """The class the model scores (``positive``, else the second of ``labels``)."""
        return self._pair[0]

    @property
    def negative_label(self) -> str:
        """The class the model answers otherwise; empty when any label is accepted and none is set
        (the data names it then: learning.label_pair)."""
        return self._pair[1]

    def partitions_start_for(self, paths: Paths) -> str:
        """The first daily partition: ``partitions_start`` when set, else the data root's first day."""
        return self.partitions_start or paths.first_day()

    @property
    def api_base_url(self) -> str:
        """Where a browser reaches the API (``api_url``, else this machine at ``api_host:api_port``)."""
        return self.api_url.strip().rstrip("/") if self.api_url.strip() else self.api_local_url

    @property
    def api_local_url(self) -> str:
        """Where this machine reaches the API it serves (``api_host:api_port``; not ``api_url``,
        the address users reach it at, maybe through a proxy): what `up` probes."""
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::", "") else self.api_host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.api_port}"

    def retry_policy(self):
        from .retry import RetryPolicy

        return RetryPolicy(max_attempts=self.retry_max_attempts, base_delay_s=self.retry_base_delay_s,
                           max_delay_s=max(self.retry_base_delay_s, 300.0), parked_retry_s=self.retry_parked_s)

    @property
    def allowed_labels(self) -> frozenset[str] | None:
        values = frozenset(v.strip() for v in self.labels.split(",") if v.strip())
        return values or None

    def consensus_config(self) -> "ConsensusConfig":
        agree, disagree = (float(x) for x in self.reliability_prior.split(","))
        return ConsensusConfig(half_life_hours=self.consensus_half_life_h, prior_agree=agree,
                               prior_disagree=disagree, conflict_margin=self.consensus_conflict_margin)


@dataclass(frozen=True)
class ConsensusConfig:
    half_life_hours: float = 168.0  # a vote a week older than the record's newest vote counts half
    prior_agree: float = 2.0  # Beta prior on a reviewer's reliability: 2/(2+1) = 0.67 before evidence
    prior_disagree: float = 1.0
    conflict_margin: float = 0.2  # (top - runner-up) / total below this -> conflict, held out
    iterations: int = 5
