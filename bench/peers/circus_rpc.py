"""Run by bench/.venv-peers/bin/python: circus's own client (CircusClient) as a server of
JSON lines, so the benchmark can time circus's API without importing circus itself.

argv: ENDPOINT TIMEOUT. Each stdin line is a circus command ({"command": ..., "properties":
...}); each stdout line is {"t0", "t1" (CLOCK_MONOTONIC, shared with the benchmark),
"reply", "error"}.
"""

import json
import sys
import time

from circus.client import CircusClient


def main() -> None:
    client = CircusClient(endpoint=sys.argv[1], timeout=float(sys.argv[2]))
    for line in sys.stdin:
        msg = json.loads(line)
        t0 = time.monotonic()
        try:
            reply, error = client.call(msg), None
        except Exception as exc:
            reply, error = None, f"{type(exc).__name__}: {exc}"
        t1 = time.monotonic()
        print(json.dumps({"t0": t0, "t1": t1, "reply": reply, "error": error}), flush=True)


if __name__ == "__main__":
    main()
