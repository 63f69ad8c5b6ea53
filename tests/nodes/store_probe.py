"""Looking into a relay store from a test, whichever backend holds it: a directory
(SQLite and files) or a ``postgresql://`` address."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from relay.storage import is_postgresql


def store_bytes(address: str | Path) -> bytes:
    """Every byte the store keeps: its files' contents, or every value of every row."""
    if not is_postgresql(address):
        return b"".join(p.read_bytes() for p in Path(address).rglob("*") if p.is_file())
    parts: list[bytes] = []
    with psycopg.connect(str(address)) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchall()
        for (table,) in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if isinstance(value, bytes):
                        parts.append(value)
                    elif value is not None:
                        parts.append(str(value).encode())
    return b"\0".join(parts)


def ciphertext_apart(address: str | Path, report_id: bytes) -> bool:
    """Whether a report's ciphertext is kept apart from its row (a file, or chunks)."""
    if not is_postgresql(address):
        return (Path(address) / "blobs" / report_id.hex()).exists()
    with psycopg.connect(str(address)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM blob_chunks c JOIN reports r ON r.blob = c.blob WHERE r.id = %s",
            (report_id,),
        ).fetchone()
    return row is not None and row[0] > 0


def leftover_uploads(address: str | Path) -> list[Any]:
    """Uploads neither placed nor dropped: temporary files, or blobs without a report."""
    if not is_postgresql(address):
        return list((Path(address) / "tmp").iterdir())
    with psycopg.connect(str(address)) as conn:
        return conn.execute(
            "SELECT id FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM reports r WHERE r.blob = b.id)"
        ).fetchall()


def sql(address: str | Path, statement: str) -> str:
    """``statement`` written with ``?`` placeholders, in the backend's own style."""
    return statement.replace("?", "%s") if is_postgresql(address) else statement
