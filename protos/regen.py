"""Regenerate the tether.v1 Python code from the .proto files.

    python protos/regen.py            # write the generated files
    python protos/regen.py --check    # exit 1 if the committed files differ

The generated modules import each other as ``tether.v1.*``, which resolves
from an installed package, not only from the repository root.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
V1 = HERE / "tether" / "v1"


def generate(out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(V1.glob("*.proto"))
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(HERE)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    return sorted((out / "tether" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed generated code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = []
        for path in generated:
            target = V1 / path.name
            new = path.read_bytes()
            if not target.exists() or target.read_bytes() != new:
                stale.append(target.name)
                if not args.check:
                    target.write_bytes(new)
        names = {p.name for p in generated}
        extra = [p.name for p in V1.glob("*_pb2*.py*") if p.name not in names]
    if args.check:
        if stale or extra:
            print(f"generated code is stale: {sorted(stale + extra)}; run: python protos/regen.py",
                  file=sys.stderr)
            return 1
        print("generated code is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
