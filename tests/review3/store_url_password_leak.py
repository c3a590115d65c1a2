"""The store URL's password is masked only when it sits in the URL's user-info
(`postgresql://user:PW@host/db`). libpq also takes it as a query parameter
(`postgresql://user@host/db?password=PW`, common with secret templating and
`sslmode=...&password=...`): `redact()` (coordinator/postgres_store.py:106) returns such a
URL unchanged, so the password is printed on the start-up line and in the log, and served
to every client by GetLeader (`tether coordinators`: "store"), which needs no admin
role. README: "logs and errors show it as ***".

Run: .venv-test/bin/python -m tests.review3.store_url_password_leak
"""
from __future__ import annotations

import json
import sys

from tests.plugins.postgres import PASSWORD, USER
from tests.review3.harness import cluster


def main() -> int:
    with cluster("pwleak") as cl:
        url = f"postgresql://{USER}@127.0.0.1:{cl.pg.port}/{cl.db}?password={PASSWORD}"
        c = cl.coordinator(url)
        cl.wait_leader()
        res = cl.cli("coordinators", "-o", "json")
        shown = json.loads(res.stdout)["coordinators"][0]["store"]
        print("tether coordinators shows store:", shown)
        print("start-up line:", c.line.strip())
        leaks = [where for where, text in (("`tether coordinators`", res.stdout),
                                           ("start-up line", c.line), ("log", c.log()))
                 if PASSWORD in text]
        if leaks:
            print("DEFECT: the store password is shown in:", ", ".join(leaks))
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
