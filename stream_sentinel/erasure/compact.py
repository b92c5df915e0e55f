"""Rewrite the DuckDB file so that deleted rows leave no bytes behind.

DuckDB marks deleted rows and reuses their blocks later; until then their bytes stay in the
file, even after a CHECKPOINT (tested: a deleted string is still found in the file). An
erasure has to remove them now, so the database is copied into a new file
(``COPY FROM DATABASE``: tables, views, sequences and their current values) which then
replaces the old one.

No write may be lost in between. DuckDB locks its file with POSIX record locks while a
process has it open; after the copy, this process takes that lock on the old file itself,
checks that nothing changed since the copy, and renames the new file over it. A process that
opened the old file in between makes the lock or the check fail, and the copy is made again.
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid

from ..atomic import fsync_path
from ..store import Store, _shared


class CompactBusy(RuntimeError):
    pass


def compact(store: Store, attempts: int = 5, lock_wait_s: float = 10.0) -> int:
    """Rewrite ``store``'s file; returns its size in bytes afterwards. Call it outside any
    session of this process (the file must close to be replaced). Other processes open the
    file for moments (sensor ticks, the API's refresh): the lock is tried for ``lock_wait_s``
    after each copy, and the copy made again only when the file changed meanwhile."""
    if store.url:  # PostgreSQL: deleted rows stay in the table files until VACUUM FULL rewrites them
        with store.connect() as con:
            # pg_statistic keeps sampled column values (an id, a text) from the last ANALYZE: sample
            # again without the erased rows, then rewrite every table, the catalog's included
            con.execute("ANALYZE")
            con.execute("VACUUM FULL")
            return int(con.execute("SELECT pg_database_size(current_database())").fetchone()[0])
    db = store.path
    for _ in range(attempts):
        tmp = db.with_name(f".{db.name}.compact-{uuid.uuid4().hex[:8]}")
        try:
            with store.connect() as con:
                if _shared(store._key).users != 1:
                    raise CompactBusy(f"{db} is held open elsewhere in this process; compact it outside a session")
                con.execute("CHECKPOINT")
                name = con.execute("SELECT current_database()").fetchone()[0]
                con.execute(f"ATTACH '{tmp}' AS _compacted")
                try:
                    con.execute(f'COPY FROM DATABASE "{name}" TO _compacted')
                finally:
                    con.execute("DETACH _compacted")
                copied = store.stamp()  # what was copied (closing writes nothing: checkpointed)
            fsync_path(tmp)
            deadline = time.monotonic() + lock_wait_s
            while True:
                fd = os.open(db, os.O_RDWR)
                try:
                    try:
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:  # a process has it open: wait for it to close
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.02)
                        continue
                    if store.stamp() != copied:
                        break  # it was written meanwhile: copy again
                    os.replace(tmp, db)
                    fsync_path(db.parent)
                    return db.stat().st_size
                finally:
                    os.close(fd)  # drops the lock: openers find the new file
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                try:
                    leftover.unlink()
                except FileNotFoundError:
                    pass
    raise CompactBusy(f"{db} was never free for long enough to be replaced ({attempts} copies); the erasure "
                      "run fails and is run again, which compacts it")
