"""Write a validation set (.npz) for a model version from testkit.modelgen.

.venv/bin/python scripts/make_validation_data.py OUT.npz --version 2 --rows 1000

`inputs` are standard-normal float32 rows; `labels` are the argmax of the version's
reference model (run with the TFLite runtime), then flipped to another class with some
probability, so accuracy is high but not 1.0; `groups` names the site of each row, and
the last group's labels are noisier, so the report shows a fairness gap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

# Runnable as a plain script from any directory, without installing the package.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from edge_agent.runtime import LoadedModel, ModelRuntimeError  # noqa: E402
from testkit.modelgen import model_for_version  # noqa: E402


def _flip_labels(
    labels: NDArray[np.int64], share: float, n_classes: int, rng: np.random.Generator
) -> NDArray[np.int64]:
    """Replace about `share` of the labels with a different, random class."""
    out = labels.copy()
    flip = rng.random(labels.size) < share
    offsets = rng.integers(1, n_classes, size=int(flip.sum()))
    out[flip] = (labels[flip] + offsets) % n_classes
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", type=Path, help="the .npz file to write")
    parser.add_argument("--version", type=int, default=1, help="model version (testkit.modelgen)")
    parser.add_argument("--n-in", type=int, default=8)
    parser.add_argument("--n-out", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument(
        "--groups",
        default="site-a,site-b",
        help="comma-separated group names (default: %(default)s)",
    )
    parser.add_argument("--label-noise", type=float, default=0.04, help="share of labels flipped")
    parser.add_argument(
        "--noisy-group-label-noise",
        type=float,
        default=0.15,
        help="share of labels flipped in the last group",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-out", type=Path, help="also write the reference model here")
    args = parser.parse_args(argv)

    groups = [g for g in args.groups.split(",") if g]
    problems = []
    if args.rows < 1:
        problems.append(f"--rows must be >= 1, got {args.rows}")
    if args.n_out < 2:
        problems.append(f"--n-out must be >= 2 (one output per class), got {args.n_out}")
    if not groups:
        problems.append("--groups needs at least one name")
    for name in ("label_noise", "noisy_group_label_noise"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            problems.append(f"--{name.replace('_', '-')} must be between 0 and 1")
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2

    try:
        data = model_for_version(args.version, args.n_in, args.n_out)
        model = LoadedModel.from_bytes(data)
    except (ValueError, ModelRuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rng = np.random.default_rng([args.seed, args.version])
    inputs = rng.standard_normal((args.rows, args.n_in)).astype(np.float32)
    clean = np.array([int(model.run(row.reshape(1, -1)).argmax()) for row in inputs])
    group_ids = rng.integers(0, len(groups), size=args.rows)
    noise = np.where(group_ids == len(groups) - 1, args.noisy_group_label_noise, args.label_noise)
    labels = clean.copy()
    for share in np.unique(noise):
        mask = noise == share
        labels[mask] = _flip_labels(clean[mask], float(share), args.n_out, rng)
    group_names = np.asarray(groups)[group_ids]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("wb") as fh:
        np.savez_compressed(fh, inputs=inputs, labels=labels, groups=group_names)
    if args.model_out is not None:
        args.model_out.parent.mkdir(parents=True, exist_ok=True)
        args.model_out.write_bytes(data)
    print(f"{args.out}: {args.rows} rows, model v{args.version} ({args.n_in} -> {args.n_out})")
    for name in groups:
        mask = group_names == name
        agree = float(np.mean(labels[mask] == clean[mask])) if mask.any() else float("nan")
        print(f"  group {name}: {int(mask.sum())} rows, labels agree with the model {agree:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
