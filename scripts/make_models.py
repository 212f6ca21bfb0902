"""Write deterministic test models: one .tflite per version, as the hub would publish.

.venv/bin/python scripts/make_models.py OUTDIR --versions 1 2 --n-in 8 --n-out 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable as a plain script from any directory, without installing the package.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from edge_agent.runtime import LoadedModel, ModelRuntimeError  # noqa: E402
from testkit.modelgen import model_for_version  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--versions", type=int, nargs="+", default=[1])
    parser.add_argument("--n-in", type=int, default=8)
    parser.add_argument("--n-out", type=int, default=4)
    parser.add_argument(
        "--extra-bytes", type=int, default=0, help="pad each model by about this many bytes"
    )
    args = parser.parse_args(argv)

    args.outdir.mkdir(parents=True, exist_ok=True)
    for version in args.versions:
        try:
            data = model_for_version(version, args.n_in, args.n_out, args.extra_bytes)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        path = args.outdir / f"model-v{version}.tflite"
        path.write_bytes(data)
        try:
            out = LoadedModel.from_bytes(data).smoke_test()
        except ModelRuntimeError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 1
        values = " ".join(f"{v:.6f}" for v in out.ravel())
        print(f"{path}  {len(data)} bytes  probe -> [{values}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
