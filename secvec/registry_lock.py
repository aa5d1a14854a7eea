"""One lock per registered model name, held by the database when the registry is PostgreSQL.

Why a lock and not compare-and-set: MLflow has no conditional update. Aliases are plain upserts and version
numbers are `max + 1`, so two runs that check "are these weights registered?" at the same instant both see
no and both create a version; a read-then-write of `champion` can lose the better model. The steps that must
not interleave (find-the-version-or-create-it, read-the-champion-then-move-it) therefore run under a mutex,
keyed on the model name, that every process of the team shares:

- The registry store is `postgresql://...` (MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI used directly): a
  session-level `pg_advisory_lock` in that database. A dedicated autocommit connection holds it (no
  transaction stays open); PostgreSQL drops it when the holder's connection ends, so a killed run never
  leaves the registry locked. Advisory locks are scoped to one database: two registries never collide.
- The registry is an HTTP `mlflow server` whose backend is PostgreSQL: the client cannot reach the server's
  database through MLflow, so `SECVEC_REGISTRY_LOCK_URI` names a PostgreSQL database every run can connect
  to: best the server's own backend DB, so runs using the DB directly and runs going through the server take
  the same lock. A Prefect `postgresql+asyncpg://` URL is accepted (the lock connects with psycopg).
- Anything else (sqlite, a file store, a server with no lock URI): an `fcntl` lock file in the temp folder,
  which serialises processes on this machine only. Good for one machine, wrong for a team: it logs so.

Holding is re-entrant per thread, so `register_once` can hold the lock around a call that takes it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_URI_ENV = "SECVEC_REGISTRY_LOCK_URI"
# A holder may be uploading a large model before creating its version (register_once); far longer means a
# stuck run (a killed one releases the lock at once).
LOCK_TIMEOUT_S = 1800
LOCAL_SCHEMES = ("sqlite", "file")  # stores one machine reaches: the file lock is all they need
_held = threading.local()  # the locks this thread holds: taking one again is a no-op
_warned: set[str] = set()


class RegistryLockTimeout(TimeoutError):
    """Another run held the registry lock of this model for longer than the timeout."""


def lock_database_url(registry_uri: str) -> str | None:
    """The PostgreSQL database to lock in, as a SQLAlchemy URL, or None for the local file lock.

    The registry store itself when it is PostgreSQL, else $SECVEC_REGISTRY_LOCK_URI, else None.
    """
    for candidate in (registry_uri, os.environ.get(LOCK_URI_ENV)):
        if candidate and _scheme(candidate) == "postgresql":
            # the lock is synchronous: an asyncpg URL (Prefect's) connects with psycopg, SQLAlchemy's default
            return candidate.replace("postgresql+asyncpg://", "postgresql+psycopg://", 1)
    if os.environ.get(LOCK_URI_ENV):
        raise ValueError(f"{LOCK_URI_ENV}: expected a postgresql:// URL, got {os.environ[LOCK_URI_ENV]!r}")
    return None


def _scheme(uri: str) -> str:
    """'postgresql+psycopg2://...' -> 'postgresql'; a bare path is a file store."""
    return uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else "file"


def lock_key(name: str) -> int:
    """A signed 64-bit advisory lock key for a model name (pg_advisory_lock takes a bigint)."""
    return int.from_bytes(hashlib.sha256(f"secvec-registry:{name}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def registry_lock(registry_uri: str, name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the registry lock of model `name` in the store at `registry_uri` (see the module docstring).

    Raises:
        RegistryLockTimeout: PostgreSQL only: another run held it for longer than `timeout_s`.
    """
    url = lock_database_url(registry_uri)
    if url is None and _scheme(registry_uri) not in LOCAL_SCHEMES and registry_uri not in _warned:
        _warned.add(registry_uri)
        log.warning("registry %s: no %s, so registrations are serialised on this machine only; runs on "
                    "several machines need it (README, Team deployment)", registry_uri, LOCK_URI_ENV)
    token = ("pg", url, lock_key(name)) if url else ("file", _lock_file(registry_uri))
    held = _held.__dict__.setdefault("tokens", set())
    if token in held:
        yield
        return
    held.add(token)
    try:
        with _advisory_lock(url, name, timeout_s) if url else _file_lock(token[1]):
            yield
    finally:
        held.discard(token)


@contextmanager
def _advisory_lock(url: str, name: str, timeout_s: float) -> Iterator[None]:
    from sqlalchemy import create_engine, exc, text
    from sqlalchemy.pool import NullPool

    # NullPool: the connection (and so the session lock) is really closed at the end, never pooled.
    engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                           connect_args={"application_name": f"secvec registry lock {name}"[:63]})
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            conn.execute(text(f"SET lock_timeout = {int(timeout_s * 1000)}"))  # milliseconds
            try:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": lock_key(name)})
            except exc.OperationalError as err:
                # 55P03 lock_not_available: lock_timeout ran out (psycopg names it sqlstate, psycopg2 pgcode)
                if (getattr(err.orig, "sqlstate", None) or getattr(err.orig, "pgcode", None)) != "55P03":
                    raise
                raise RegistryLockTimeout(f"registry lock of model {name!r} in {where} still held by another "
                                          f"run after {timeout_s:g} s") from None
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": lock_key(name)})
    finally:
        engine.dispose()


def _lock_file(registry_uri: str) -> Path:
    # One file per store (not per model name) keeps /tmp tidy; holders are brief.
    key = hashlib.sha256(str(registry_uri).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"secvec-registry-{key}.lock"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
