"""``pictor models``: the backbone zoo, with size, cost and where the weights come from;
``pictor backup``: a consistent copy of an index, also while it is served."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from typing import Any

from pictor.config import default_cache_dir
from pictor.core.files import write_atomic
from pictor.errors import require_server_extra

HELP = """\
List every registered backbone: family, embedding dim, parameters, GFLOPs (billions of
multiply-adds per image at the weights' input size, torchvision's convention), the default
weights and whether those weights are available here without a network.

Pick one with --backbone for pictor index and pictor train (pictor serve serves the
backbone its index was built with), `backbone =` in a config file or PICTOR_BACKBONE. The
default, efficientnet_lite0, ships its ImageNet weights in a pip package; the others load
torchvision / timm weights from their caches (downloaded once when online), or a local
checkpoint with --weights PATH.

examples:
  pictor models
  pictor models --family ResNet --json
"""

COLUMNS = ("name", "family", "dim", "params_m", "gflops", "input", "default_weights", "offline")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pictor models`` and ``pictor backup`` to the ``pictor`` parser."""
    p = sub.add_parser(
        "models", help="list the backbones (dim, params, GFLOPs, weights)",
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--family", help="only families whose name holds this (case-insensitive), e.g. ResNet, MobileNet")
    p.add_argument("--json", action="store_true", help="print JSON (one object per backbone)")
    p.set_defaults(run=run)
    _register_backup(sub)


BACKUP_HELP = """\
Copy an index into a new folder, consistently even while `pictor serve` writes to it (Upsert,
Delete): copying the folder with cp, tar or rsync then can give a damaged database. The copy
is opened once to check it (which brings its FAISS index up to date with its database) and is
an index like any other: serve it, or move it where the original was.

examples:
  pictor backup index backups/index-2026-11-30
"""


def _register_backup(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("backup", help="copy an index consistently, also while it is served",
                       description=BACKUP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index", help="the index folder (`pictor index --out`)")
    p.add_argument("dest", help="a new folder for the copy")
    p.set_defaults(run=run_backup)


def run_backup(args: argparse.Namespace) -> int:
    require_server_extra("pictor backup")
    from pictor.core.store import backup_store
    from pictor.core.whitening import open_index

    backup_store(args.index, args.dest)
    try:
        copy, _, _ = open_index(args.dest)  # a copy that does not open as `serve` opens it is no backup
    except BaseException:
        shutil.rmtree(args.dest, ignore_errors=True)  # this run made it: no unusable copy left in the way
        raise
    with copy:
        print(f"backed up {args.index} to {args.dest}: {len(copy)} items (checked: it opens; a log line "
              "saying its FAISS snapshot was brought up to date with its database is expected for the "
              "copy of an index in use)")
    return 0


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON); imports torch only here."""
    require_server_extra("pictor models")
    rows = model_rows(args.family)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        print("\n--backbone NAME picks one; --weights: a tag, a checkpoint PATH, or random. 'offline' "
              "yes: its weights are here (package or cache), no network needed.")
    return 0


def model_rows(family: str | None = None) -> list[dict[str, Any]]:
    """One dict per registered backbone with the columns of ``COLUMNS``."""
    from pictor.core import backbones as bb
    from pictor.errors import NotFoundError

    infos = [bb.get_backbone_info(n) for n in bb.backbone_names()]
    if family:
        # The start of any word of the name: "Inception" finds "GoogLeNet/Inception", "MobileNet"
        # "MobileNetV3", "SENet" not "DenseNet".
        at_word = re.compile(r"(?:^|[/\s-])" + re.escape(family.lower()))
        infos = [i for i in infos if at_word.search(i.family.lower())]
        if not infos:
            families = sorted({bb.get_backbone_info(n).family for n in bb.backbone_names()})
            raise NotFoundError(f"no family {family!r}; families: {', '.join(families)}")
    cache = _CostCache()
    rows = []
    for info in infos:
        cost = cache.get(info.name)
        rows.append({
            "name": info.name,
            "family": info.family,
            "dim": info.dim,
            "params_m": round(cost["params"] / 1e6, 1),
            "gflops": round(cost["gflops"], 2),
            "input": cost["input_size"],
            "default_weights": bb.default_weights(info.name),
            "offline": bb.weights_available_offline(info.name),
        })
    cache.save()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table, columns aligned."""
    head = ("name", "family", "dim", "params", "GFLOPs", "input", "default weights",
            "offline")
    cells = [head] + [
        (r["name"], r["family"], str(r["dim"]), f"{r['params_m']:.1f}M", f"{r['gflops']:.2f}",
         str(r["input"]), r["default_weights"], "yes" if r["offline"] else "no")
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    right = {2, 3, 4, 5}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class _CostCache:
    """Parameters/GFLOPs per backbone, kept on disk: counting timm networks takes seconds."""

    def __init__(self) -> None:
        import timm
        import torchvision

        self.path = default_cache_dir() / "backbone-costs.json"
        self.version = f"torchvision {torchvision.__version__}, timm {timm.__version__}"
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
            self.costs: dict[str, Any] = data["costs"] if data.get("version") == self.version \
                else {}
        except (OSError, ValueError, KeyError, TypeError):
            self.costs = {}

    def get(self, name: str) -> dict[str, Any]:
        if name not in self.costs:
            from pictor.core.backbones import complexity

            c = complexity(name)
            self.costs[name] = {"params": c.params, "gflops": c.gflops,
                                "input_size": c.input_size}
            self.dirty = True
        return dict(self.costs[name])

    def save(self) -> None:
        if not self.dirty:
            return
        try:  # a cache: failing to write it must not fail the command
            self.path.parent.mkdir(parents=True, exist_ok=True)
            data = json.dumps({"version": self.version, "costs": self.costs}).encode()
            write_atomic(self.path, lambda f: f.write(data), durable=False)
        except OSError:
            pass
