"""The served model on images it never saw, as a user measures it: a share of each class's
images is held out, `pictor train` trains on the rest (its own validation split calibrates the
open-set thresholds), `pictor index` indexes the rest with the model, and `pictor eval MODEL
HELDOUT --index INDEX` scores the held-out images. One row per split seed: top-1, how many
known images Classify would answer "unknown" (the calibration's budget is 5% of its validation
images), and top-1 counting those as wrong.

Run from the project root, under the shared CPU lock::

    flock /tmp/pictor-cpu.lock .venv/bin/python bench/heldout.py --data ../shared/datasets/flowers/train
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

from common import machine_line, parser, pictor


def split(data: Path, out: Path, share: float, seed: int) -> None:
    """Links to ``share`` of each class folder's files (at random, seeded) under out/heldout, the
    rest under out/train."""
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.iterdir() if f.is_file())
        random.Random(seed).shuffle(files)
        cut = round(len(files) * share)
        for part, chosen in (("heldout", files[:cut]), ("train", files[cut:])):
            (out / part / folder.name).mkdir(parents=True)
            for f in chosen:
                os.symlink(f.resolve(), out / part / folder.name / f.name)


def one_seed(data: Path, work: Path, mode: str, share: float, seed: int, cache: str) -> dict[str, float]:
    split(data, work, share, seed)
    start = time.perf_counter()
    pictor("train", work / "train", "--out", work / "model.pt", "--mode", mode, "--seed", seed, "--cache-dir", cache)
    pictor("index", work / "train", "--out", work / "index", "--model", work / "model.pt")
    report = json.loads(pictor("eval", work / "model.pt", work / "heldout", "--index", work / "index", "--json"))
    open_set = report["open_set"]
    return {"seed": seed, "n": report["n"], "top1": report["top1"], "unknown": open_set["known_unknown"],
            "served": open_set["top1_served"], "seconds": time.perf_counter() - start}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--data", type=Path, required=True, help="image-folder tree, one folder per class")
    p.add_argument("--mode", default="linear", choices=("linear", "finetune"), help="pictor train --mode")
    p.add_argument("--heldout", type=float, default=0.2, help="share of each class held out")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated split (and training) seeds")
    p.add_argument("--cache-dir", default="", help="embedding cache for pictor train (default: a temporary one)")
    args = p.parse_args()
    print(machine_line())
    print(f"\n{args.data}: {args.heldout:.0%} of each class held out; pictor train --mode {args.mode} on the rest\n")
    print("| seed | held-out images | top-1 | known answered unknown | top-1, unknown counted wrong | seconds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or str(Path(tmp) / "cache")
        for seed in (int(s) for s in args.seeds.split(",")):
            r = one_seed(args.data, Path(tmp) / f"seed{seed}", args.mode, args.heldout, seed, cache)
            print(f"| {seed} | {r['n']} | {r['top1']:.3f} | {r['unknown']:.1%} | {r['served']:.3f} | {r['seconds']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
