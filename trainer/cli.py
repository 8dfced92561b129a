"""``pictor train`` and ``pictor eval``. Heavy imports happen only when a subcommand runs."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pictor.config import (
    MAX_BATCH_SIZE,
    ModelSettings,
    add_flag,
    model_settings,
    number,
    set_by,
    show_progress,
    whole_number,
)
from pictor.trainer.config import MODES, TrainConfig

if TYPE_CHECKING:
    from pictor.trainer.train import TrainResult

log = logging.getLogger(__name__)

TRAIN_DESCRIPTION = """\
Train a classifier for your classes on a pretrained backbone (transfer learning) and write
one self-describing model file: backbone and weights, head, class names, preprocessing,
training settings, validation metrics and open-set thresholds.

DATA is a folder with one sub-folder per class, or a CSV/JSONL manifest with `path` and
`label`. A stratified share (--val-fraction) is split off for validation unless --val is
given. Unreadable images are skipped and counted; a class with fewer than --min-per-class
training images is an error. Embeddings of the frozen backbone are cached on disk, so a
second linear run with other settings does not embed again.
"""

TRAIN_EPILOG = """\
examples:
  pictor train photos/ --out photos.pt                    # linear head, 20% validation
  pictor train photos/ --out photos.pt --mode finetune --epochs 8
  pictor train labels.csv --val val.jsonl --out m.pt      # manifests: path,label
  pictor serve --index index --model photos.pt            # Classify with the head
"""

EVAL_DESCRIPTION = """\
Top-1/top-5 accuracy (top-5 only for more than 5 classes, null in --json otherwise), per-class
precision/recall/F1 and a confusion matrix of MODEL on DATA (folder tree or manifest). Images
of classes the model does not know are left out of these. Images the model was trained or
validated on (same content) are counted and said: measured on them, the figures flatter it.

With --index (the index Classify serves from; not open in a running server), a model with
open-set rejection (the default of `pictor train`) also gets how often Classify would answer
"unknown": for images of the model's classes (and top-1 counting those as wrong), and for
images of other classes, so a folder of "other" pictures in DATA measures rejection. The
rule compares each image with its nearest indexed neighbour, so there is no such figure
without the index.
"""


EVAL_EPILOG = """\
examples:
  pictor eval photos.pt test/                             # table for people
  pictor eval photos.pt test/ --json --png confusion.png  # JSON for scripts + a plot
  pictor eval photos.pt test/ --index index               # "unknown" answers as served from index
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``train`` and ``eval`` to the ``pictor`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    t = sub.add_parser("train", help="train a classification head on labelled images",
                       description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG, formatter_class=fmt)
    t.add_argument("data", metavar="DATA", help="folder with one sub-folder per class, or .csv/.jsonl "
                   "manifest with path and label columns (paths relative to the manifest's folder)")
    t.add_argument("--out", required=True, metavar="MODEL", help="model file to write (missing folders are made)")
    t.add_argument("--mode", choices=MODES, default=TrainConfig.mode,
                   help="linear: frozen backbone, cached embeddings (fast); finetune: train the last "
                   "stages too (slower, usually more accurate; when it loses validation accuracy, "
                   "the linear head is kept) (default %(default)s)")
    t.add_argument("--val", metavar="DATA", help="validation set (default: split off DATA)")
    t.add_argument("--val-fraction", type=number,
                   help="share of each class split off for validation when --val is not given "
                   f"(default {TrainConfig.val_fraction})")
    t.add_argument("--seed", type=whole_number, default=TrainConfig.seed,
                   help="seed of the split, initialisation and augmentation (default %(default)s)")
    add_flag(t, "backbone")
    add_flag(t, "weights")
    add_flag(t, "device")
    add_flag(t, "pooling", help_end="pool as the index the model will serve with")
    add_flag(t, "precision",
             help="auto (default): bf16 where the hardware runs it fast (fp16 on a GPU without bf16), "
             "else fp32; fine-tuning on a CPU: fp32 (bf16 lost accuracy). The model file records it, and "
             "serving keeps it where the hardware runs it natively")
    add_flag(t, "batch_size", help=f"images per step (default {TrainConfig.batch_size}, at most {MAX_BATCH_SIZE})")
    add_flag(t, "max_pixels", help_end="larger files are skipped and counted")
    add_flag(t, "config", help="TOML file with settings, as for `pictor index` (flags and PICTOR_* env "
             "override it)")
    t.add_argument("--min-per-class", type=whole_number, default=TrainConfig.min_per_class,
                   help="fewest training images a class may have, at least 2; fewer is an error (default %(default)s)")
    t.add_argument("--max-per-class", type=whole_number, default=TrainConfig.max_per_class,
                   help="cap images per class (default 0 = all)")
    t.add_argument("--cache-dir", default="", help="embedding cache (default: $PICTOR_CACHE_DIR, "
                   "$XDG_CACHE_HOME/pictor or ~/.cache/pictor; 'none' disables it)")
    t.add_argument("--weight-decays", type=_numbers, help="linear: comma-separated weight decays tried "
                   "on the validation split (default " + ",".join(map(str, TrainConfig.weight_decays)) + ")")
    t.add_argument("--no-flip", action="store_true", help="no mirrored training views for the linear heads "
                   "(in finetune mode: the first probe and the one refitted on the tuned backbone)")
    t.add_argument("--epochs", type=whole_number, default=TrainConfig.epochs,
                   help="finetune: most epochs (default %(default)s)")
    t.add_argument("--unfreeze", type=whole_number, default=TrainConfig.unfreeze,
                   help="finetune: last N stages trained (default %(default)s)")
    t.add_argument("--lr", type=number, default=TrainConfig.lr,
                   help="finetune: head learning rate (default %(default)s)")
    t.add_argument("--backbone-lr", type=number, default=TrainConfig.backbone_lr,
                   help="finetune: learning rate of the unfrozen stages (default %(default)s)")
    t.add_argument("--label-smoothing", type=number, default=TrainConfig.label_smoothing,
                   help="finetune: label smoothing (default %(default)s)")
    t.add_argument("--patience", type=whole_number, default=TrainConfig.patience,
                   help="finetune: stop after this many epochs without validation gain (default %(default)s)")
    t.add_argument("--mixup", type=number, default=TrainConfig.mixup,
                   help="finetune: mixup Beta alpha (default 0 = off)")
    t.add_argument("--cutmix", type=number, default=TrainConfig.cutmix,
                   help="finetune: CutMix Beta alpha (default 0 = off)")
    t.add_argument("--train-size", type=whole_number, default=TrainConfig.train_size,
                   help="finetune crop size (default 0 = 7/8 of the input size)")
    t.add_argument("--no-open-set", action="store_true", help="no open-set thresholds")
    t.add_argument("--max-known-rejected", type=number,
                   default=TrainConfig.max_known_rejected,
                   help="open set: share of known validation images allowed to come back "
                   "unknown (default %(default)s)")
    t.add_argument("--json", action="store_true", help="print JSON instead of lines for people: the "
                   "validation report (accuracy, per-class figures, confusion matrix), training details, "
                   "open-set thresholds, skipped images")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(run=run_train)

    e = sub.add_parser("eval", help="evaluate a model file on labelled images",
                       description=EVAL_DESCRIPTION,
                       epilog=EVAL_EPILOG, formatter_class=fmt)
    e.add_argument("model", metavar="MODEL", help="model file from `pictor train`")
    e.add_argument("data", metavar="DATA", help="labelled images: folder tree or .csv/.jsonl manifest "
                   "(paths relative to the manifest's folder)")
    e.add_argument("--index", metavar="DIR", help="index store Classify serves from: adds how "
                   "often it would answer 'unknown' (open-set models); not while a server has it open")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table (with each "
                   "image's prediction, and whether Classify would answer unknown with --index)")
    e.add_argument("--png", metavar="FILE", help="write the confusion matrix as a PNG (missing folders are made)")
    e.add_argument("--out-json", metavar="FILE", help="also write the JSON report to FILE (missing folders are made)")
    add_flag(e, "weights", metavar="PATH", help="the checkpoint the model was trained from, when it is no "
             "longer where the model file says")
    add_flag(e, "device")
    add_flag(e, "precision", help="as `pictor serve --precision`: auto (default) keeps the model's where "
             "the hardware runs it natively, so eval measures what Classify serves")
    add_flag(e, "batch_size")
    add_flag(e, "max_pixels", help_end="larger files are skipped and counted")
    add_flag(e, "config")
    e.add_argument("--cache-dir", default="", help="embedding cache (default: $PICTOR_CACHE_DIR, "
                   "$XDG_CACHE_HOME/pictor or ~/.cache/pictor; 'none' disables it)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(run=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from pictor.errors import InvalidRequestError, require_server_extra

    require_server_extra("pictor train")
    from pictor.core.files import check_output_file
    from pictor.trainer.metrics import top5_text
    from pictor.trainer.train import head_description, train

    decays = args.weight_decays or ()
    if args.weight_decays is not None and not decays:
        raise InvalidRequestError("--weight-decays is empty; give comma-separated numbers, e.g. 0.001,0.01,0.1")
    if args.val and args.val_fraction is not None:
        raise InvalidRequestError("--val-fraction splits DATA when no --val is given; with --val it would "
                                  "be ignored: give one of them")
    m = model_settings(vars(args), args.config)  # backbone, weights, ... as `pictor index` reads them
    _warn_compile_unused(m, "train")
    config = TrainConfig(
        mode=args.mode, backbone=m.backbone or TrainConfig.backbone, weights=m.weights, device=m.device,
        precision=m.precision, pooling=m.pooling or TrainConfig.pooling, seed=args.seed,
        val_fraction=TrainConfig.val_fraction if args.val_fraction is None else args.val_fraction,
        min_per_class=args.min_per_class, max_per_class=args.max_per_class,
        batch_size=m.batch_size, max_pixels=m.max_pixels, cache_dir=args.cache_dir,
        progress=show_progress(args.no_progress),
        flip_views=not args.no_flip, epochs=args.epochs, unfreeze=args.unfreeze, lr=args.lr,
        backbone_lr=args.backbone_lr, label_smoothing=args.label_smoothing,
        patience=args.patience, mixup=args.mixup, cutmix=args.cutmix,
        train_size=args.train_size, open_set=not args.no_open_set,
        max_known_rejected=args.max_known_rejected,
        weight_decays=decays or TrainConfig.weight_decays,  # none given: the default grid
    )
    check_output_file(args.out, "--out", inputs=(("DATA", args.data), ("--val", args.val),
                                                 ("--weights", m.weights)))  # before the work, not after it
    result = train(config, args.data, val_data=args.val, out=args.out)
    if args.json:
        json.dump(train_summary(args.out, result), sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    metrics = result.model.metrics
    hits = result.cache["hits"]
    mirrored = ", training images also mirrored" if config.flip_views else ""  # (so more than the images)
    cached = (f" ({hits} embedding{'' if hits == 1 else 's'} from the cache, {result.cache['misses']} computed"
              f"{mirrored})" if hits + result.cache["misses"] else "")  # 0 + 0: --cache-dir none
    print(f"wrote {args.out}: {head_description(config.mode, metrics)}, {len(result.model.class_names)} classes, "
          f"{metrics['train_images']} training images, {len(result.skipped)} skipped, "
          f"{result.seconds:.0f}s{cached}")
    print(f"validation: top-1: {result.report['top1']:.4f}   {top5_text(result.report)}"
          f"macro F1: {result.report['macro_f1']:.4f} ({result.report['n']} images)")
    if result.model.open_set:
        print(f"open set: {result.model.open_set.thresholds.describe()}")
    if result.model.spec.finetune:
        print("the backbone is fine-tuned: build the index with it: "
              f"pictor index GALLERY --model {args.out}")
    return 0


def _numbers(text: str) -> tuple[float, ...]:
    """The argparse type of a comma-separated list of numbers (blank items, as in "0.1,", left out)."""
    return tuple(number(x) for x in text.split(",") if x.strip())


def train_summary(out: str, result: TrainResult) -> dict[str, Any]:
    """What `pictor train --json` prints: the lines for people, as data."""
    from pictor.trainer.cache import skipped_rows
    from pictor.trainer.train import head_description

    model, report = result.model, result.report
    thresholds = model.open_set.thresholds.to_dict() if model.open_set else None
    return {
        "model": out,
        "head": head_description(model.training["mode"], model.metrics),
        "class_names": model.class_names,
        "finetuned_backbone": bool(model.spec.finetune),  # then the index needs `--model`
        "seconds": round(result.seconds, 1),
        "cache": result.cache,
        "validation": report,
        # The model file's metrics that the report does not hold (weight decay, temperature, ...).
        "details": {k: v for k, v in model.metrics.items() if k not in report},
        # A test that is off has threshold -inf, which JSON cannot hold: null.
        "open_set": thresholds and {k: v if math.isfinite(v) else None for k, v in thresholds.items()},
        "skipped": skipped_rows(result.skipped),
    }


def run_eval(args: argparse.Namespace) -> int:
    from pictor.errors import InvalidRequestError, require_server_extra

    require_server_extra("pictor eval")
    from pictor.core.files import check_output_file
    from pictor.core.head import load_model
    from pictor.trainer.evaluate import evaluate
    from pictor.trainer.metrics import format_report

    m = model_settings(vars(args), args.config)
    _warn_compile_unused(m, "eval")
    inputs = (("MODEL", args.model), ("DATA", args.data), ("--weights", m.weights))
    for flag, out in (("--png", args.png), ("--out-json", args.out_json)):  # before the work
        if out is not None:  # ("" is refused as empty)
            check_output_file(out, flag, inputs)
    if args.png and args.out_json and Path(args.png).absolute() == Path(args.out_json).absolute():
        raise InvalidRequestError(f"--png and --out-json both name {args.png}; the second would replace the "
                                  "first: name two files")
    model = load_model(args.model)
    if wrong := m.disagreement(model.spec.backbone, model.spec.pooling):  # the model's own embeds
        raise InvalidRequestError(f"{wrong} set, but the model file {args.model} embeds with "
                                  f"{model.spec.describe()}; leave them out")
    report: dict[str, Any] = evaluate(model, args.data, index=args.index, cache_dir=args.cache_dir,
                                      device=m.device, precision=m.precision, batch_size=m.batch_size,
                                      max_pixels=m.max_pixels,
                                      weights=m.weights or None,
                                      progress=show_progress(args.no_progress))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    _write_eval_files(report, args.png, args.out_json)  # after the figures: a full disk loses none
    if args.json:
        return 0
    extras = []
    if report["skipped"]:
        extras.append(f"{len(report['skipped'])} image(s) skipped (unreadable, or over the pixel cap)")
    if report["ignored"]:
        extras.append(f"{report['ignored']} image(s) of other classes left out of the accuracy")
    if report["training_images"]:
        extras.append(f"{report['training_images']} of the images measured are training images of the model "
                      "(the figures overstate its accuracy on new images)")
    if report["validation_images"]:
        extras.append(f"{report['validation_images']} of the images measured are validation images of the model "
                      "(they chose its settings: the figures are not a test on new images)")
    if model.open_set is not None and not args.index:
        extras.append("--index INDEX adds how often Classify would answer 'unknown'")
    if args.png:
        extras.append(f"confusion matrix: {args.png}")
    if extras:
        print("\n" + "; ".join(extras))
    return 0


def _write_eval_files(report: dict[str, Any], png: str | None, out_json: str | None) -> None:
    from pictor.core.files import write_atomic, write_failure
    from pictor.trainer.metrics import plot_confusion

    text = json.dumps(report, indent=2).encode() if out_json else b""
    for flag, path in (("--png", png), ("--out-json", out_json)):
        if not path:
            continue
        try:
            if flag == "--png":
                plot_confusion(report, path)
            else:
                write_atomic(Path(path), lambda f: f.write(text), durable=False)
        except OSError as e:
            raise write_failure(f"{flag} {path}", e, "run eval again (its figures are above)") from e


def _warn_compile_unused(m: ModelSettings, command: str) -> None:
    """``compile`` from the environment or a file shared with `index` and `serve` does not
    apply here: say so rather than seem to honour it."""
    if m.compile:
        log.warning("compile (from %s) applies to `pictor index` and `pictor serve`; `pictor %s` runs the "
                    "model without it", set_by(m, "compile"), command)
