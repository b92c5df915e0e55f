"""The keyed hash that names an erased record: HMAC-SHA256 of its id.

The audit table, the ingest rule ``erased`` and every message name an erasure by this hash,
never by the id: without the key, a hash cannot be tested against a guessed id (a plain
sha256 of a short id could be). The key comes from ``STREAM_SENTINEL_ERASURE_KEY`` or, when
that is not set, from ``<data root>/erasure.key`` (32 random bytes, created on first use,
readable by its owner only). Losing the key makes the ``erased`` rule forget earlier erasures
(they can no longer be matched), so back it up with the data root.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from ..atomic import write_bytes_atomic

KEY_FILE = "erasure.key"
ENV = "STREAM_SENTINEL_ERASURE_KEY"


class IdHasher:
    def __init__(self, key: bytes):
        self._key = key

    @classmethod
    def for_root(cls, home: Path, create: bool = True) -> "IdHasher | None":
        """The hasher of a data root; None when it has no key yet and ``create`` is False."""
        env = os.environ.get(ENV)
        if env:
            return cls(env.encode())
        path = Path(home) / KEY_FILE
        try:
            return cls(bytes.fromhex(path.read_text().strip()))
        except FileNotFoundError:
            if not create:
                return None
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, secrets.token_hex(32).encode() + b"\n")
        os.chmod(path, 0o600)
        return cls(bytes.fromhex(path.read_text().strip()))

    def __call__(self, record_id: str) -> str:
        return hmac.new(self._key, record_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
