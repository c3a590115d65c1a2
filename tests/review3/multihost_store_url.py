"""libpq's own answer to a PostgreSQL failover, a multi-host URL
(`postgresql://u:pw@db1:5432,db2:5432/tether?target_session_attrs=read-write`), is refused
at start-up with "Port could not be cast to integer value as '5432,db2:5432'":
redact() (coordinator/postgres_store.py:106-114) reads `urlsplit(url).port`, which raises
for a host list, before psycopg ever sees the URL. So the coordinators cannot follow a
promoted standby by themselves (README: "PostgreSQL, which operators already run,
replicate and back up"; the failure table has no row for a database failover).

Run: .venv-test/bin/python -m tests.review3.multihost_store_url
"""
from __future__ import annotations

import sys

from tests.plugins.postgres import PASSWORD, USER
from tests.review3.harness import cluster


def main() -> int:
    with cluster("multihost") as cl:
        p = cl.pg.port
        url = (f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{p},127.0.0.1:{p}/{cl.db}"
               "?target_session_attrs=read-write")
        import psycopg

        with psycopg.connect(url) as conn:  # libpq itself takes it
            print("psycopg connects with it:", conn.execute("SELECT 1").fetchone())
        try:
            d = cl.coordinator(url)
        except TimeoutError as exc:
            print("tether coordinator did not start:", str(exc)[-300:])
            print("DEFECT: a multi-host store URL is refused")
            return 1
        print("started:", d.line.strip())
        return 0


if __name__ == "__main__":
    sys.exit(main())
