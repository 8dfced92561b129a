"""Training and evaluation on tiny images drawn here, with the offline default backbone.

Three classes a linear probe must separate perfectly (red discs, green squares, blue
triangles on noisy grey), both modes, the embedding cache, the model file round trip with
fine-tuned weights, refusal of mismatched indexes, and the CLI entry points.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import logging
import os
import random
import shutil
import threading
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import unlistable
from PIL import Image, ImageDraw
from wcwidth import wcswidth

from pictor.cli import main
from pictor.config import ServerSettings
from pictor.core.backbones import create_backbone
from pictor.core.embedder import Embedder, EmbedOutput, create_embedder, resolve_device
from pictor.core.head import load_model, top_k_labels
from pictor.errors import IncompatibleModelError, InvalidRequestError, NotFoundError
from pictor.server.engine import Engine
from pictor.trainer import data as data_mod
from pictor.trainer import metrics
from pictor.trainer.config import TrainConfig
from pictor.trainer.evaluate import evaluate
from pictor.trainer.finetune import _drops_last_batch, unfreeze_last, warmup_cosine
from pictor.trainer.linear import fit_temperature, select_head
from pictor.trainer.metrics import classification_report, format_report, plot_confusion
from pictor.trainer.openset import calibrate_open_set, far_threshold, nearest_similarity
from pictor.trainer.train import build_embedder, head_description, train

CLASSES = ("disc", "square", "triangle")
COLOURS = {"disc": (220, 30, 30), "square": (30, 200, 40), "triangle": (30, 60, 220)}


def draw(shape: str, rng: random.Random, size: int = 48) -> Image.Image:
    """One coloured shape at a random place and size on a noisy grey background."""
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(90, 150, (size, size, 3))
    img = Image.fromarray(noise.astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 4, size // 2 - 2)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    jitter = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[shape])
    if shape == "disc":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=jitter)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=jitter)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    return img


def make_tree(root: Path, per_class: int, seed: int = 0, classes: Sequence[str] = CLASSES
              ) -> Path:
    rng = random.Random(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(c, rng).save(root / c / f"{c}_{i}.png")
    return root


class CountingEmbedder(Embedder):
    """The real embedder, counting the images that reach the backbone."""

    images_embedded = 0

    def forward_preprocessed(self, tensors: Iterable[torch.Tensor], batch_size: int | None = None) -> EmbedOutput:
        tensors = list(tensors)
        self.images_embedded += len(tensors)
        return super().forward_preprocessed(tensors, batch_size)


@pytest.fixture(scope="module")
def embedder() -> CountingEmbedder:
    """The offline default backbone, loaded once for the module (never fine-tuned in place)."""
    return CountingEmbedder(create_backbone("efficientnet_lite0"), device=resolve_device("cpu"),
                            precision="fp32", pooling="avg", batch_size=16)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("shapes"), per_class=8)


@pytest.fixture(scope="module")
def shapes_index(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index store of the ``shapes`` images, labelled by folder."""
    index = tmp_path_factory.mktemp("shapes_index") / "index"
    assert main(["index", str(shapes), "--out", str(index), "--no-progress"]) == 0
    return index


def config(tmp_path: Path, **kw: object) -> TrainConfig:
    defaults: dict[str, object] = {"cache_dir": str(tmp_path / "cache"), "val_fraction": 0.25,
                                   "min_per_class": 3, "progress": False, "batch_size": 16}
    return TrainConfig(**(defaults | kw))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- data


def test_a_class_folder_that_cannot_be_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # It was "a folder with no images, so not a class", and the model was trained a class short.
    tree = make_tree(tmp_path / "tree", per_class=5)
    locked = sorted(p for p in tree.iterdir() if p.is_dir())[0]
    unlistable(monkeypatch, locked)
    with pytest.raises(InvalidRequestError, match=f"class folders of {tree} that cannot be read: "
                                                  f"{locked.name} \\(Permission denied\\); fix their permissions"):
        data_mod.load_samples(tree)


def test_folder_tree_manifests_and_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tree = make_tree(tmp_path / "tree", per_class=5)
    # Folders meant as classes whose files are not listed are said, not dropped in silence.
    (tree / "phone").mkdir()
    (tree / "phone" / "IMG_1.HEIC").write_bytes(b"heic")
    (tree / "phone" / "IMG_2.heic").write_bytes(b"heic")
    (tree / "empty").mkdir()
    (tree / "disc" / "x.jpe").write_bytes(sorted((tree / "disc").iterdir())[0].read_bytes())
    (tree / "circle").symlink_to("disc")  # listed once, as disc, and said so: no class of its own either
    samples = data_mod.load_samples(tree)
    assert "circle is a link to a folder listed at its own place; not listed again" in caplog.text
    assert "left out 2 files not named as images (2 .heic)" in caplog.text
    assert "with no images, so not classes: empty, phone" in caplog.text
    caplog.clear()  # a class folder named in decomposed Unicode (macOS) is the class, not a stray
    decomposed = tmp_path / "nfd" / "rose\u0301s"
    decomposed.mkdir(parents=True)
    for src in sorted((tree / "disc").iterdir())[:3]:
        (decomposed / src.name).write_bytes(src.read_bytes())
    assert {s.label for s in data_mod.load_samples(tmp_path / "nfd")} == {"ros\u00e9s"}
    assert "not classes" not in caplog.text
    assert [s.path.name for s in samples if s.path.suffix == ".jpe"] == ["x.jpe"]  # JPEG's other suffix
    (tree / "disc" / "x.jpe").unlink()
    samples = data_mod.load_samples(tree)
    assert len(samples) == 15 and data_mod.class_names(samples) == list(CLASSES)
    rows = [(str(s.path.relative_to(tmp_path)), s.label) for s in samples]
    with (tmp_path / "m.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    (tmp_path / "m.jsonl").write_text(
        "\n".join(json.dumps({"path": p, "label": lab}) for p, lab in rows) + "\n")
    assert data_mod.load_samples(tmp_path / "m.csv") == samples
    assert data_mod.load_samples(tmp_path / "m.jsonl") == samples
    train_s, val_s = data_mod.stratified_split(samples, 0.4, seed=1)
    assert sorted(s.label for s in val_s) == sorted(CLASSES * 2)
    assert set(train_s).isdisjoint(val_s) and len(train_s) + len(val_s) == 15
    assert data_mod.stratified_split(samples, 0.4, seed=1) == (train_s, val_s)  # seeded


def test_bad_data_gives_clear_errors(tmp_path: Path, embedder: CountingEmbedder) -> None:
    (tmp_path / "bad.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(InvalidRequestError, match="'path' and 'label'"):
        data_mod.load_samples(tmp_path / "bad.csv")
    (tmp_path / "nolabel.csv").write_text("path,label\na.png,x\nb.png,\n")
    with pytest.raises(InvalidRequestError, match=r"nolabel.csv:3: 'label' is empty$"):
        data_mod.load_samples(tmp_path / "nolabel.csv")
    (tmp_path / "empty.csv").write_text("path,label\n")  # (not "looked for .bmp .gif ...")
    with pytest.raises(InvalidRequestError, match=r"manifest \S+empty.csv lists no images$"):
        data_mod.load_samples(tmp_path / "empty.csv")
    # One image under two keys would sit on both sides of the split (here under two labels).
    (tmp_path / "twice.csv").write_text("path,label,key\na.png,x,1\nb.png,x,2\n./a.png,y,3\n")
    with pytest.raises(InvalidRequestError, match=r"1 image\(s\) are listed more than once, e.g. .*a.png "
                                                  r"\(labels: x, y\)"):
        data_mod.load_samples(tmp_path / "twice.csv")
    (tmp_path / "twice.csv").write_text(f"path,label\na.png,x\n{tmp_path / 'a.png'},y\n")  # relative, absolute
    with pytest.raises(InvalidRequestError, match="listed more than once"):
        data_mod.load_samples(tmp_path / "twice.csv")
    flat = tmp_path / "flat"
    flat.mkdir()
    draw("disc", random.Random(0)).save(flat / "a.png")
    with pytest.raises(InvalidRequestError, match="no class folders"):
        data_mod.load_samples(flat)
    (flat / "empty").mkdir()
    (flat / "empty" / "notes.txt").write_text("")
    (flat / "disc").mkdir()
    draw("disc", random.Random(0)).save(flat / "disc" / "b.png")
    assert data_mod.load_samples(flat) == [data_mod.Sample(flat / "disc" / "b.png", "disc")]
    with pytest.raises(NotFoundError, match="does not exist"):
        data_mod.load_samples(tmp_path / "nope")
    tree = make_tree(tmp_path / "tree", per_class=6)
    # Counted in the training split, before anything is embedded: 3 listed leave 2 to train on.
    for f in list((tree / "square").iterdir())[3:]:
        f.unlink()
    before = embedder.images_embedded
    with pytest.raises(InvalidRequestError,
                       match=r"training images after --val-fraction 0.25 .*fewer than 3 training images: 'square' "
                             r"\(2 of 3 listed\); add images \(a class needs 4 for --val-fraction 0.25 to leave 3 "
                             r"to train on\)"):
        train(config(tmp_path), tree, embedder=embedder)
    # A cap too low for the classes' minimum: the cap is the fix, not more images.
    with pytest.raises(InvalidRequestError, match=r"^--max-per-class 3 leaves every class it caps fewer than "
                       r"--min-per-class 3 training images after --val-fraction 0.25 \(that takes 4 images\); "
                       r"give --max-per-class 4 or more, or lower --min-per-class$"):
        train(config(tmp_path, max_per_class=3), tree, embedder=embedder)
    with pytest.raises(InvalidRequestError, match=r"after --max-per-class 4 and --val-fraction 0.25 .*: 'square' "
                                                  r"\(2 of 3 listed\)"):  # a class small of itself
        train(config(tmp_path, max_per_class=4), tree, embedder=embedder)
    assert embedder.images_embedded == before
    tree = make_tree(tmp_path / "tree2", per_class=4)
    for i in (0, 1):  # listed, not usable
        (tree / "triangle" / f"triangle_{i}.png").write_text("not a picture")
    with pytest.raises(InvalidRequestError, match=r"fewer than 3 usable images: 'triangle' \([12]\)"):
        train(config(tmp_path), tree, embedder=embedder)
    for i in (2, 3):  # none usable: the class is named all the same, not dropped without a word
        (tree / "triangle" / f"triangle_{i}.png").write_text("not a picture")
    with pytest.raises(InvalidRequestError, match=r"fewer than 3 usable images: 'triangle' \(0\)"):
        train(config(tmp_path), tree, embedder=embedder)
    # Paths written from the current folder, not the manifest's: nothing can be read, and why.
    (tmp_path / "lists").mkdir()
    listed = "".join(f"tree/{c}/{c}_{i}.png,{c}\n" for c in ("disc", "square") for i in range(4))
    (tmp_path / "lists" / "train.csv").write_text("path,label\n" + listed)
    with pytest.raises(InvalidRequestError, match=r"train.csv: none of the 6 training images could be read \(each "
                                                  r"is named above\); a manifest's relative paths are read from its "
                                                  r"own folder, .*lists$"):
        train(config(tmp_path), tmp_path / "lists" / "train.csv", embedder=embedder)
    # A --val of other classes is refused before anything is embedded, naming both sides' classes;
    # one whose images are all unreadable says so (it said "shares no class").
    tree = make_tree(tmp_path / "tree3", per_class=4)
    other = tmp_path / "other"
    (other / "oval").mkdir(parents=True)
    shutil.copy(tree / "disc" / "disc_0.png", other / "oval")
    before = embedder.images_embedded
    with pytest.raises(InvalidRequestError, match=r"validation set .*other \(classes 'oval'\) shares no class "
                                                  r"with the training set .*tree3 \(classes 'disc', 'square'"):
        train(config(tmp_path), tree, val_data=other, embedder=embedder)
    assert embedder.images_embedded == before
    unreadable = tmp_path / "unreadable"
    for c in ("disc", "square"):
        (unreadable / c).mkdir(parents=True)
        (unreadable / c / "x.jpg").write_bytes(b"")
    with pytest.raises(InvalidRequestError, match=r"unreadable: none of the 2 validation images could be read"):
        train(config(tmp_path), tree, val_data=unreadable, embedder=embedder)


# --------------------------------------------------------------------------- linear


def test_linear_separates_shapes_and_caches_embeddings(
    shapes: Path, tmp_path: Path, embedder: CountingEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    emb, before = embedder, embedder.images_embedded
    first = train(config(tmp_path, weight_decays=(1e-3,)), shapes, embedder=emb)
    assert first.report["top1"] == 1.0
    assert first.model.class_names == list(CLASSES)
    assert first.model.training["precision"] == "fp32"  # as resolved: what serving keeps
    assert first.model.open_set is not None  # 3 classes: calibrated leaving each one out
    n_images = 24
    assert first.cache["misses"] == 18 * 2 + 6  # train views plain+mirror, val plain
    assert emb.images_embedded - before == first.cache["misses"]
    # Other hyper-parameters: every embedding comes from the cache, none from the backbone.
    second = train(config(tmp_path, weight_decays=(1e-2, 1e-1)), shapes, embedder=emb)
    assert second.cache == {"hits": first.cache["misses"], "misses": 0}
    assert emb.images_embedded - before == first.cache["misses"]
    assert second.model.metrics["weight_decay"] in (1e-2, 1e-1)
    assert second.model.data_fingerprint == first.model.data_fingerprint
    assert second.model.metrics["train_images"] + second.report["n"] == n_images
    # Another precision is another embedding space (bf16 vectors differ): nothing from the cache.
    monkeypatch.setattr(emb, "precision", "bf16")
    third = train(config(tmp_path, weight_decays=(1e-3,)), shapes, embedder=emb)
    assert third.cache == {"hits": 0, "misses": first.cache["misses"]}
    assert third.model.training["precision"] == "bf16"


def test_cached_embeddings_are_those_of_this_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # A file decoded otherwise since (MPO photos drafted as JPEGs from DECODE_VERSION 2) is
    # another vector: an old cache's entry for its content would be used silently.
    from pictor.trainer import cache

    spec = create_embedder(device="cpu").spec
    before = cache.spec_key(spec, "plain", "fp32")
    monkeypatch.setattr(cache, "DECODE_VERSION", "next")
    assert cache.spec_key(spec, "plain", "fp32") != before


def test_a_damaged_cache_entry_is_a_miss(tmp_path: Path) -> None:
    from pictor.trainer.cache import EmbeddingCache

    spec = create_embedder(device="cpu").spec
    cache = EmbeddingCache(tmp_path, spec, "plain", "fp32")
    vector = np.ones(spec.dim, np.float32)
    for damage in (b"", b"\x93NUMPY garbage", np.ones(3, np.float32).tobytes()):  # empty, torn, short
        cache.put("ab12", vector)
        stored = cache.get("ab12")
        assert stored is not None and np.array_equal(stored, vector)
        next(tmp_path.rglob("ab12.npy")).write_bytes(damage)
        assert cache.get("ab12") is None


def test_an_unwritable_cache_costs_time_not_the_run(
    shapes: Path, tmp_path: Path, embedder: CountingEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder would go")
    result = train(config(tmp_path, weight_decays=(1e-3,)), shapes, embedder=embedder)
    assert result.report["top1"] == 1.0
    assert caplog.text.count("going on without storing embeddings") == 1  # not once per view and split
    assert not_a_folder.read_text().startswith("a file")


def test_unreadable_images_are_skipped_and_counted(
    tmp_path: Path, embedder: CountingEmbedder
) -> None:
    tree = make_tree(tmp_path / "tree", per_class=6)
    (tree / "disc" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tree / "square" / "empty.jpg").write_bytes(b"")
    whole = (tree / "disc" / "disc_0.png").read_bytes()
    (tree / "disc" / "cut.png").write_bytes(whole[:len(whole) // 2])  # its header reads: found bad on decoding
    before = embedder.images_embedded
    result = train(config(tmp_path, weight_decays=(1e-3,)), tree, embedder=embedder)
    assert {p.name for p, _ in result.skipped} == {"broken.png", "empty.jpg", "cut.png"}
    assert result.model.metrics["skipped_images"] == 3
    assert result.report["top1"] == 1.0
    assert result.cache["misses"] == embedder.images_embedded - before  # "computed": the cut one is not


def test_an_embedding_that_underflowed_is_skipped_not_trained_on(tmp_path: Path) -> None:
    from pictor.trainer.cache import embed_samples
    from pictor.trainer.data import Sample

    class Underflowing(Embedder):  # fp16 on some random-init networks: NaN or zero for some images
        def forward_preprocessed(self, tensors: Iterable[torch.Tensor], batch_size: int | None = None) -> EmbedOutput:
            out = super().forward_preprocessed(tensors, batch_size)
            out.embeddings[1::2] = np.nan
            return out

    tree = make_tree(tmp_path / "tree", per_class=2, classes=("disc", "square"))
    samples = [Sample(p, p.parent.name) for p in sorted(tree.rglob("*.png"))]
    under = Underflowing(create_backbone("efficientnet_lite0", weights="random"), device=resolve_device("cpu"),
                         precision="bf16", pooling="avg", batch_size=16)
    done, stats = embed_samples(samples, under, cache_root=tmp_path / "cache", views=("plain", "hflip"))
    assert [s.path for s in done.samples] == [samples[0].path, samples[2].path]
    assert done.embeddings.shape == (2, 2, under.spec.dim) and np.isfinite(done.embeddings).all()
    assert [(p, why) for p, why in done.skipped] == [
        (samples[i].path, "its embedding is all zero or not finite (at bf16; --precision fp32 may embed it)")
        for i in (1, 3)]
    assert stats == {"hits": 0, "misses": 4}  # the NaN vectors are not cached either


@pytest.mark.parametrize(("setting", "flag"), [
    ({"label_smoothing": 2.0}, "--label-smoothing must be at least 0 and below 1, got 2"),
    ({"lr": -1.0}, "--lr must be above 0, got -1"),
    ({"weight_decays": (1e-3, -1.0)}, "--weight-decays must be 0 or more, got -1"),
    ({"max_known_rejected": 1.5}, "--max-known-rejected must be at least 0 and below 1, got 1.5"),
    ({"train_size": 7}, "--train-size must be 0 .* or 32 to 1024, got 7"),
    ({"train_size": 100000}, "--train-size must be 0 .* or 32 to 1024, got 100000"),  # (ran out of memory)
    ({"seed": 2**70}, "--seed must be between 0 and 4294967295"),
    ({"batch_size": 100000}, "--batch-size must be between 1 and 4096, got 100000"),
    ({"lr": float("inf")}, "--lr must be above 0, got inf"),
    ({"weight_decays": (1e-3, float("nan"))}, "--weight-decays must be 0 or more, got nan"),
    ({"mixup": -1.0}, "--mixup must be 0 .* or more, got -1"),
    ({"val_fraction": 0.0}, "--val-fraction must be above 0 and below 1, got 0"),
    ({"min_per_class": 1}, "--min-per-class must be at least 2, got 1"),
])
def test_settings_that_cannot_train_are_refused_by_their_flag(setting: dict[str, object], flag: str) -> None:
    with pytest.raises(InvalidRequestError, match=flag):
        TrainConfig(**setting)  # type: ignore[arg-type]


def test_a_class_spelled_otherwise_is_named() -> None:
    # A manifest's JSON number labels stay as written: 1.0 is not the class 1, nor Daisy daisy.
    assert data_mod.spelling_hint(["1.0", "Daisy", "2.5", "NaN", "rose"], ["1", "daisy", "nan", "tulip"]) == (
        "; class names are compared as written, case and digits alike: rename '1.0' to '1', 'Daisy' to 'daisy', "
        "'NaN' to 'nan'")
    assert data_mod.spelling_hint(["rose"], ["tulip"]) == ""


def test_validation_copies_of_training_images_are_left_out(
    shapes: Path, tmp_path: Path, embedder: CountingEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    # Validation on the training images themselves measures memory, and would put the open-set
    # thresholds at similarity 1 (every new image "unknown"): refused.
    with pytest.raises(InvalidRequestError, match="every validation image of the trained classes is also a "
                                                  "training image"):
        train(config(tmp_path, weight_decays=(1e-3,)), shapes, val_data=shapes, embedder=embedder)
    # Two copies among fresh images: those two are left out, with a warning.
    train_tree = make_tree(tmp_path / "train", per_class=5, seed=6)
    val = make_tree(tmp_path / "val", per_class=3, seed=5)
    shutil.copy(train_tree / "disc" / "disc_0.png", val / "disc" / "copy.png")
    shutil.copy(train_tree / "square" / "square_1.png", val / "square" / "copy.png")
    # The same picture under two labels is named with both, in training or across the split
    # (where the copy was only said to be left out of validation).
    shutil.copy(train_tree / "disc" / "disc_1.png", train_tree / "square" / "odd.png")
    shutil.copy(train_tree / "disc" / "disc_2.png", val / "square" / "also_disc.png")
    result = train(config(tmp_path, weight_decays=(1e-3,)), train_tree, val_data=val, embedder=embedder)
    assert result.report["n"] == 9
    assert "validation: 3 image(s) are copies of training images (same content)" in caplog.text
    assert (f"2 image(s) appear under more than one label (same content), e.g. {train_tree / 'disc' / 'disc_1.png'} "
            f"as 'disc', {train_tree / 'square' / 'odd.png'} as 'square'") in caplog.text
    assert "rest on 9 validation images" in caplog.text and "use more validation images, or" in caplog.text
    # A validation set without one of the classes says so.
    shutil.rmtree(val / "triangle")
    for other in ("star", "Disc"):  # and classes training has not, which it names
        (val / other).mkdir()
        shutil.copy(val / "disc" / "disc_2.png", val / other / "s.png")
    train(config(tmp_path, weight_decays=(1e-3,)), train_tree, val_data=val, embedder=embedder)
    assert "validation has no images of triangle" in caplog.text
    assert ("validation: 2 image(s) of classes absent from training are ignored ('Disc', 'star'); class names "
            "are compared as written, case and digits alike: rename 'Disc' to 'disc'") in caplog.text


def test_temperature_sharpens_only_on_evidence() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.5, 0.0]])
    # All right: the loss would fall without end as the temperature does; none is chosen.
    assert fit_temperature(logits, np.array([0, 1, 0, 0])) == 1.0
    # One wrong with a clear margin: sharper logits would cost it, so the optimum is inside the grid.
    assert 0.05 < fit_temperature(logits, np.array([0, 1, 0, 1])) < 20.0


def test_weight_decay_ties_at_all_right_keep_the_most_regularised_head() -> None:
    rng = np.random.default_rng(0)
    x, y = unit_clusters(rng, np.eye(3, 16) * 3, 12)  # far apart: every decay gets all right
    fit = select_head(x, y, x, y, 3, weight_decays=(1e-4, 1e-2, 0.1))
    assert [s["val_accuracy"] for s in fit.sweep] == [1.0, 1.0, 1.0]
    assert fit.weight_decay == 0.1  # not the lowest loss, 1e-4's, sharpened without measure
    one_wrong = np.where(np.arange(len(y)) == 0, (y + 1) % 3, y)  # a label no head gets right
    fit = select_head(x, y, x, one_wrong, 3, weight_decays=(1e-4, 1e-2, 0.1))
    assert fit.val_loss == min(s["val_loss"] for s in fit.sweep if s["val_accuracy"] == fit.val_accuracy)


def test_macro_f1_counts_a_class_that_is_only_predicted() -> None:
    # As scikit-learn: "c" has no images but took one, so its F1 of 0 is in the mean.
    probs = np.eye(3)[[0, 0, 1, 2]]
    report = classification_report(np.array([0, 0, 1, 1]), probs, ["a", "b", "c"])
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert "(c: no images here, but answered: counted in macro F1 with F1 0" in format_report(report)
    never = classification_report(np.array([0, 0, 1, 1]), np.eye(3)[[0, 0, 1, 1]], ["a", "b", "c"])
    assert never["macro_f1"] == 1.0 and "(c: no images here and never answered: left out of macro F1)" in format_report(never)


def test_names_people_read_line_up_in_the_table_and_fit_the_plot(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    names = ["a" * 70, "rose", "三角形の緑", "\N{FIRE}"]
    report = classification_report(np.arange(4), np.eye(4), names)
    rows = format_report(report).splitlines()[3:]
    # Padded by terminal columns (CJK and emoji take two each), the figures line up.
    assert len({wcswidth(row) for row in rows}) == 1, rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned once per glyph its font lacks
        plot_confusion(report, str(tmp_path / "cm.png"))
    assert "cannot draw 2 class name(s), so they are numbered by row: #3 三角形の緑, #4 \N{FIRE}" in caplog.text
    assert metrics._tick_labels(names) == ["a" * 23 + "\u2026", "rose", "#3", "#4"]


def test_accuracy_ranks_equal_probabilities_as_the_confusion_matrix_does() -> None:
    # A tie goes to the first class everywhere: top-1 once read 0 beside a diagonal of 1.
    probs = np.array([[0.0, 0.0, 0.5, 0.5]] * 3 + [[0.25] * 4])
    for _ in range(5):  # (numpy's default sort is not stable: each run may order a tie anew)
        report = classification_report(np.array([2, 2, 2, 0]), probs, ["a", "b", "c", "d"])
        assert report["top1"] == 1.0 and np.trace(np.array(report["confusion"])) == 4
    assert [name for name, _ in top_k_labels(np.array([0.1, 0.45, 0.45]), ["a", "b", "c"], 2)] == ["b", "c"]


# --------------------------------------------------------------------------- open set


def unit_clusters(rng: np.random.Generator, centres: np.ndarray, n: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around each centre, like embeddings of images of a class."""
    x = np.concatenate([c + 0.3 * rng.normal(size=(n, centres.shape[1])) / np.sqrt(centres.shape[1])
                        for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(len(centres)), n)


@pytest.mark.parametrize("classes", [4, 2])
def test_open_set_rejects_an_unseen_class_within_the_budget(classes: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes + 1, 32)) / np.sqrt(32)
    x_train, y_train = unit_clusters(rng, centres[:classes], 40)
    x_val, y_val = unit_clusters(rng, centres[:classes], 40)
    cal = calibrate_open_set(x_train[None], y_train, x_val, y_val, classes,
                             max_known_rejected=0.05)
    unseen, _ = unit_clusters(rng, centres[classes:], 40)
    known, _ = unit_clusters(rng, centres[:classes], 40)
    def rejected(x: np.ndarray) -> float:
        return float(cal.open_set.is_unknown(x, nearest_similarity(x, x_train)).mean())
    assert rejected(unseen) > 0.8
    assert rejected(known) <= 0.1
    # Unlike every class (random directions): the far-neighbour test alone answers them.
    far = rng.normal(size=(40, 32)).astype(np.float32)
    far /= np.linalg.norm(far, axis=1, keepdims=True)
    far_only = dataclasses.replace(cal.open_set.thresholds, class_fit=-np.inf)
    assert far_only.is_unknown(cal.open_set.gaussians.score(far), nearest_similarity(far, x_train)).all()
    assert np.mean(nearest_similarity(x_val, x_train) < far_only.far_similarity) <= 0.02
    # Without comparable neighbours (NaN) the class fit decides alone, against its own threshold
    # (the pair's, vetoed by near neighbours, would reject known images far beyond the budget).
    alone = cal.open_set.is_unknown(known, np.full(len(known), np.nan))
    pair_fit_alone = cal.open_set.gaussians.score(known) < cal.open_set.thresholds.class_fit
    assert alone.mean() <= 0.1
    if classes > 2:  # pseudo-unknowns exist only when a class can be left out
        assert cal.pseudo_unknown_rejected is not None and cal.pseudo_unknown_rejected > 0.8
        assert pair_fit_alone.mean() > 0.5, pair_fit_alone.mean()
        # The log says its figures are estimates, of what, and against which budget.
        assert (f"open set, estimated by leaving each class out of the fit in turn as a stand-in for an unknown "
                f"class: {cal.pseudo_unknown_rejected:.1%} of the left-out class's validation images answered "
                f"unknown, and {cal.pseudo_known_rejected:.1%} of the other classes' (budget "
                "5.0%: --max-known-rejected 0.05)") in caplog.text
    else:  # not measured, not 0.0 (which read as "unknown images are never rejected")
        assert cal.pseudo_unknown_rejected is None
        assert "with fewer than 3 classes there is no estimate for unknown classes" in caplog.text


def test_an_open_set_estimate_over_its_budget_says_why() -> None:
    from pictor.trainer.openset import _estimate_text

    assert ("and 6.2% of the other classes' (budget 5.0%: --max-known-rejected 0.05; over it here, as leaving a class "
            "out takes some known images' nearest neighbours away)") in _estimate_text(0.225, 0.062, 0.05)
    assert "over it" not in _estimate_text(0.225, 0.04, 0.05)


def test_far_threshold_holds_its_share_from_few_validation_images() -> None:
    rng = np.random.default_rng(0)
    for n in (20, 60, 500):  # the 1% quantile of 60 images is their minimum: 1.6% fall below
        rejected = [np.mean(rng.normal(0.8, 0.05, 1000) < far_threshold(rng.normal(0.8, 0.05, n), 0.01))
                    for _ in range(200)]
        assert np.mean(rejected) < 0.02, n  # about the 1% asked for
    assert far_threshold(rng.normal(0.8, 0.05, 19), 0.01) == -np.inf  # too few to tell the spread


# --------------------------------------------------------------------------- finetune


def test_finetune_one_epoch_round_trip_and_refusals(shapes: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from timm.data import Mixup

    mixed: list[int] = []
    mix_call = Mixup.__call__

    def spy(self: Mixup, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mixed.append(len(x))
        return mix_call(self, x, target)

    monkeypatch.setattr(Mixup, "__call__", spy)
    out = tmp_path / "ft.pt"
    cfg = config(tmp_path, mode="finetune", epochs=1, unfreeze=1, train_size=96,
                 weight_decays=(1e-3,), batch_size=8, mixup=0.2, cutmix=1.0)
    emb = create_embedder(device="cpu")
    plain_spec = emb.spec
    result = train(cfg, shapes, out=out, embedder=emb)
    assert mixed == [8, 8]  # 18 training images, full batches of 8
    assert np.isfinite(result.model.metrics["history"][0]["train_loss"])
    again = train(cfg, shapes, embedder=create_embedder(device="cpu"))  # the seed repeats the mixing too
    assert again.model.metrics["history"] == result.model.metrics["history"]
    model = load_model(out)
    assert model.spec.finetune and model.spec != plain_spec
    assert model.backbone_state, "the changed backbone tensors travel in the model file"
    assert all(k.startswith("model.") for k in model.backbone_state)
    assert result.model.metrics["epochs_run"] == 1
    # 18 x 2 views + 6 before tuning, as --mode linear; the tuned backbone embeds them anew.
    assert result.cache == {"hits": 0, "misses": 42 + 42}
    assert result.report["top1"] == 1.0
    # The model file rebuilds the same tuned backbone: same embeddings, same answers.
    rebuilt = model.create_embedder(device="cpu")
    assert rebuilt.spec == model.spec
    images = [draw(c, random.Random(7)) for c in CLASSES]
    np.testing.assert_allclose(rebuilt.embed(images), emb.embed(images), atol=1e-5)
    # (After one epoch the answers on new images are not the point, and bf16 training moves
    # the close ones: the file must give the answers the trained model gives.)
    np.testing.assert_allclose(model.predict_proba(rebuilt.embed(images)),
                               result.model.predict_proba(emb.embed(images)), atol=1e-4)
    # An index built with the plain backbone is refused, naming the fix.
    with pytest.raises(IncompatibleModelError, match="pictor index GALLERY --model MODEL"):
        model.check_index(plain_spec)
    # An index built with it is served with it, which Info says; without it, refused, naming it.
    index = tmp_path / "ft-index"
    assert main(["index", str(shapes), "--out", str(index), "--model", str(out), "--pooling", "max"]) == 2
    assert "pooling max (--pooling) disagrees with the model file" in capsys.readouterr().err
    assert main(["index", str(shapes), "--out", str(index), "--model", str(out), "--no-progress"]) == 0
    engine = Engine.load(ServerSettings(index=str(index), model=str(out), device="cpu"))
    try:
        assert engine.info().finetune == model.spec.finetune[:12]
    finally:
        engine.close()
    with pytest.raises(IncompatibleModelError, match="fine-tuned backbone .* --model MODEL"):
        Engine.load(ServerSettings(index=str(index), device="cpu"))


def test_fine_tuning_with_no_stage_unfrozen_makes_a_model_of_the_plain_backbone(shapes: Path, tmp_path: Path) -> None:
    # Its spec had the fingerprint of no tensors: eval, serve and index --model refused the file.
    out = tmp_path / "ft0.pt"
    cfg = config(tmp_path, mode="finetune", epochs=1, unfreeze=0, train_size=96, weight_decays=(1e-3,), batch_size=8)
    emb = create_embedder(device="cpu")
    train(cfg, shapes, out=out, embedder=emb)
    model = load_model(out)
    assert model.spec == emb.spec and not model.spec.finetune and not model.backbone_state
    assert model.create_embedder(device="cpu").spec == model.spec  # what eval and serve build


def test_a_joint_head_reports_its_own_weight_decay(shapes: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Its metrics gave the first probe's decay, picked by a sweep, for a head AdamW trained.
    from pictor.trainer import train as train_mod

    monkeypatch.setattr(train_mod, "evaluate_head", lambda *_: (1.0, 0.0))  # the joint head wins
    cfg = config(tmp_path, mode="finetune", epochs=1, unfreeze=0, train_size=96, weight_decays=(1e-3,),
                 batch_size=8, weight_decay=0.02)
    m = train(cfg, shapes, embedder=create_embedder(device="cpu")).model.metrics
    assert m["head"] == "joint" and m["weight_decay"] == 0.02 and "sweep" not in m
    assert [row["weight_decay"] for row in m["linear_probe_sweep"]] == [1e-3]


def test_fine_tuning_that_lowers_accuracy_keeps_the_probe(shapes: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # A learning rate of 50 wrecks the backbone in one epoch (validation at chance): the model
    # must then be the linear probe on the pretrained backbone, which needs no index of its own.
    emb = create_embedder(device="cpu")
    plain_spec, images = emb.spec, [draw(c, random.Random(7)) for c in CLASSES]
    before = emb.embed(images)
    cfg = config(tmp_path, mode="finetune", epochs=1, unfreeze=99, train_size=96,
                 weight_decays=(1e-3,), batch_size=8, lr=50.0, backbone_lr=50.0)
    result = train(cfg, shapes, embedder=emb)
    m = result.model.metrics
    assert m["head"] == "linear probe" and m["joint_head_val_accuracy"] < m["linear_probe_val_accuracy"]
    assert result.report["top1"] == m["linear_probe_val_accuracy"] == 1.0
    assert result.model.spec == plain_spec and not result.model.backbone_state
    np.testing.assert_allclose(emb.embed(images), before, atol=1e-6)  # the backbone is restored
    assert "fine-tuning lowered validation top-1 (the linear probe 1.0000; on the tuned" in caplog.text
    assert head_description("finetune", m).startswith("linear head (fine-tuning lowered")  # as summaries say it
    assert "training all of them" in caplog.text  # --unfreeze 99 of 7 stages


def test_unfreeze_and_schedule() -> None:
    # The stages themselves are the backbone's (test_backbones.py): here, what unfreezing them trains.
    resnet = create_backbone("resnet18", "random")
    trainable = unfreeze_last(resnet, 1)
    assert trainable and all(n.startswith("extractor.layer4.") for n in trainable)
    # VGG's last stage is the block of layers up to the last pooling layer.
    vgg = create_backbone("vgg11_bn", "random")
    trainable = unfreeze_last(vgg, 1)
    assert {n.rsplit(".", 1)[0] for n in trainable} == {f"extractor.features.{i}" for i in (22, 23, 25, 26)}
    # All of EfficientNet-Lite0's 7 stages and the layers after them, but not its ImageNet classifier.
    lite = create_backbone("efficientnet_lite0", "random")
    trainable = unfreeze_last(lite, 99)
    assert trainable[0].startswith("model.blocks.0.") and "model.conv_head.weight" in trainable
    assert not any(n.startswith(("model.conv_stem.", "model.classifier.")) for n in trainable)
    # An epoch sees every image but for a short last batch under half a batch (the flowers
    # split's 14 of 750 at 32); 28 of 60 were left out each epoch before.
    drops = {n: _drops_last_batch(n, 32) for n in (10, 32, 60, 750, 33)}
    assert drops == {10: False, 32: False, 60: False, 750: True, 33: True}
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) < f(5) < f(9) <= 1.0 and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


# --------------------------------------------------------------------------- CLI


def test_train_and_eval_skip_images_over_the_pixel_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree(tmp_path / "tree", per_class=6)  # 48 x 48 = 2,304 pixels each
    draw("disc", random.Random(1), size=100).save(tree / "disc" / "poster.png")  # 10,000 pixels
    model_path = tmp_path / "m.pt"
    args = ["train", str(tree), "--out", str(model_path), "--val-fraction", "0.25", "--min-per-class", "3",
            "--weight-decays", "0.001", "--cache-dir", str(tmp_path / "cache"), "--no-open-set", "--no-progress"]
    assert main(args) == 0 and load_model(model_path).metrics["skipped_images"] == 0  # fills the cache
    model_path.unlink()
    monkeypatch.setenv("PICTOR_MAX_PIXELS", "5000")  # as the decode error's hint says to set it
    capsys.readouterr()
    assert main(args) == 0  # every image's embedding cached: the cap is checked all the same
    assert load_model(model_path).metrics["skipped_images"] == 1
    # The poster's cached vectors are no hits: 12 training images (2 views) + 6 validation.
    assert "(30 embeddings from the cache, 0 computed, training images also mirrored)" in capsys.readouterr().out
    monkeypatch.delenv("PICTOR_MAX_PIXELS")
    capsys.readouterr()
    rc = main(["eval", str(model_path), str(tree), "--max-pixels", "5000", "--json", "--cache-dir", "none",
               "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["n"] == 18
    (skipped,) = report["skipped"]
    assert skipped["path"].endswith("poster.png") and "10,000" in skipped["error"]


def test_train_skips_a_fifo_named_like_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A FIFO is no image file: read, it would block training for ever (`pictor index` skips it too)."""
    tree = make_tree(tmp_path / "tree", per_class=6)
    fifo = tree / "disc" / "pipe.jpg"
    os.mkfifo(fifo)
    model_path = tmp_path / "m.pt"
    args = ["train", str(tree), "--out", str(model_path), "--val-fraction", "0.25", "--min-per-class", "3",
            "--weight-decays", "0.001", "--cache-dir", "none", "--no-open-set", "--no-progress"]
    exit_codes: list[int] = []
    run = threading.Thread(target=lambda: exit_codes.append(main(args)), daemon=True)
    run.start()
    run.join(timeout=180)
    if run.is_alive():  # blocked opening the FIFO: a writer that closes at once ends the wait
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader: stuck elsewhere
            pass
        run.join(timeout=60)
        pytest.fail("pictor train blocked on a FIFO named like an image")
    assert exit_codes == [0]
    assert ", 1 skipped, " in capsys.readouterr().out
    assert load_model(model_path).metrics["skipped_images"] == 1
    assert f"skipped {fifo}: not a regular file" in caplog.text


def test_cli_train_then_eval(shapes: Path, shapes_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    model_path = tmp_path / "shapes.pt"
    cache = str(tmp_path / "cache")
    rc = main(["train", str(shapes), "--out", str(model_path), "--val-fraction", "0.25",
               "--min-per-class", "3", "--weight-decays", "0.001", "--cache-dir", cache,
               "--no-progress"])
    assert rc == 0 and model_path.is_file()
    out = capsys.readouterr()
    assert "top-1: 1.0000" in out.out
    assert "top-5" not in out.out  # 3 classes: always 1, so not shown
    assert "(0 embeddings from the cache, 42 computed, training images also mirrored)" in out.out
    assert "open-set thresholds rest on 6 validation images" in caplog.text  # too few to trust
    assert "use more images (or --val)" in caplog.text  # split off: --val is the other way
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pictor.trainer.linear"):
        rc = main(["train", str(shapes), "--out", str(tmp_path / "again.pt"), "--val-fraction", "0.25",
                   "--min-per-class", "3", "--weight-decays", "0.001,0.1", "--cache-dir", cache,
                   "--no-progress", "--json"])
    summary = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone
    assert rc == 0 and summary["model"] == str(tmp_path / "again.pt")
    assert summary["cache"] == {"hits": 42, "misses": 0}  # the same images: nothing embedded again
    assert summary["validation"]["top1"] == 1.0 and summary["validation"]["n"] == 6
    assert summary["class_names"] == ["disc", "square", "triangle"] and not summary["finetuned_backbone"]
    assert summary["details"]["weight_decay"] == 0.1 and summary["details"]["train_images"] == 18
    assert set(summary["open_set"]) >= {"class_fit", "neighbor_similarity"} and summary["skipped"] == []
    assert "weight decay 0.1 kept: the strongest of those with every validation image right" in caplog.text
    png, report_json = tmp_path / "plots" / "cm", tmp_path / "reports" / "report.json"  # cm: no suffix added
    rc = main(["eval", str(model_path), str(shapes), "--json", "--png", str(png),
               "--out-json", str(report_json), "--cache-dir", cache, "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] == 1.0 and report["n"] == 24
    assert report["top5"] is None  # 3 classes: always 1, not measured (it was 1.0)
    assert report["training_images"] == 18  # 24 less the 6 of validation: said, as they flatter
    assert report["validation_images"] == 6  # they chose its settings: said too
    assert report["confusion"] == [[8, 0, 0], [0, 8, 0], [0, 0, 8]]
    assert set(report["per_class"]["disc"]) == {"precision", "recall", "f1", "support"}
    assert len(report["images"]) == 24  # each image's answer, to compare with Classify's
    assert all(r["predicted"] == r["label"] and r["probability"] > 0.5 for r in report["images"])
    assert png.stat().st_size > 1000 and json.loads(report_json.read_text()) == report
    assert report["precision"] == load_model(model_path).training["precision"]  # as served
    rc = main(["eval", str(model_path), str(shapes), "--json", "--precision", "fp32", "--cache-dir", "none",
               "--no-progress"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["precision"] == "fp32"
    rc = main(["eval", str(model_path), str(shapes), "--cache-dir", cache, "--no-progress"])
    table = capsys.readouterr().out
    assert rc == 0 and "precision" in table and "triangle" in table
    assert "open set" not in table and "--index INDEX adds how often" in table
    assert "18 of the images measured are training images of the model" in table
    assert "6 of the images measured are validation images of the model (they chose its settings" in table
    # Over an index of the same images every one has itself as nearest neighbour (similarity
    # 1), so as served none of them is unknown, whatever the class fit says.
    rc = main(["eval", str(model_path), str(shapes), "--index", str(shapes_index),
               "--cache-dir", cache, "--no-progress"])
    table = capsys.readouterr().out
    assert rc == 0 and f"open set (neighbours: index {shapes_index} (24 items))" in table
    assert "classes answered unknown: 0.0% of 24; top-1 counting those as wrong: 1.0000" in table
    rc = main(["eval", str(model_path), str(shapes), "--index", str(tmp_path / "nowhere")])
    assert rc == 2 and "nowhere does not exist" in capsys.readouterr().err
    # An output that is a folder is refused before any work, by its flag.
    rc = main(["eval", str(model_path), str(shapes), "--out-json", str(tmp_path)])
    assert rc == 2 and f"--out-json {tmp_path}: is a folder; name a file" in capsys.readouterr().err
    rc = main(["train", str(shapes), "--out", str(tmp_path), "--min-per-class", "3"])
    assert rc == 2 and f"--out {tmp_path}: is a folder" in capsys.readouterr().err
    # An output that is one of the run's inputs would replace it: refused before any work.
    rc = main(["eval", str(model_path), str(shapes), "--png", str(model_path)])
    assert rc == 2 and f"--png {model_path}: is MODEL, which this run reads; writing it would replace it" in (
        capsys.readouterr().err)
    image = next(shapes.rglob("*.png"))
    rc = main(["eval", str(model_path), str(shapes), "--png", str(image)])
    assert rc == 2 and f"--png {image}: is a file in DATA, which this run reads" in capsys.readouterr().err
    rc = main(["eval", str(model_path), str(shapes), "--png", str(png), "--out-json", str(png)])
    assert rc == 2 and f"--png and --out-json both name {png}" in capsys.readouterr().err
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(shapes.rglob("*.png"))))
    rc = main(["train", str(manifest), "--out", str(manifest)])
    assert rc == 2 and "is DATA, which this run reads" in capsys.readouterr().err and manifest.read_text().startswith("path")
    # A write that fails after the work (a full disk) is one line, after the report it would have held.
    def full_disk(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pictor.trainer.metrics.plot_confusion", full_disk)
    rc = main(["eval", str(model_path), str(shapes), "--png", str(png), "--cache-dir", cache, "--no-progress"])
    out = capsys.readouterr()
    assert rc == 2 and "triangle" in out.out
    assert f"cannot write --png {png}: the disk is full; free space and run eval again (its figures are above)" in out.err


def test_model_file_finds_its_checkpoint_from_anywhere(shapes: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    from pictor.core.head import load_model

    (tmp_path / "run").mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "run" / "r18.pth")
    monkeypatch.chdir(tmp_path / "run")  # the checkpoint given relative to here
    rc = main(["train", str(shapes), "--out", "m.pt", "--backbone", "resnet18", "--weights", "r18.pth",
               "--min-per-class", "3", "--weight-decays", "0.001", "--no-progress"])
    assert rc == 0
    monkeypatch.chdir(tmp_path)
    model = load_model("run/m.pt")
    assert model.training["weights"] == str(tmp_path / "run" / "r18.pth")
    assert model.create_embedder(device="cpu").spec == model.spec
    (tmp_path / "run" / "r18.pth").rename(tmp_path / "moved.pth")
    with pytest.raises(NotFoundError, match="r18.pth that this model was trained from does not exist; "
                                            "give its new place with --weights PATH"):
        model.create_embedder(device="cpu")
    with pytest.raises(NotFoundError, match="--weights IMAGENET1K_V1: no such checkpoint file; this model was "
                                            "trained from a local checkpoint: give that file's path"):
        model.create_embedder(device="cpu", weights="IMAGENET1K_V1")  # a tag, where the file is wanted
    assert model.create_embedder(device="cpu", weights=str(tmp_path / "moved.pth")).spec == model.spec
    rc = main(["eval", "run/m.pt", str(shapes), "--weights", "moved.pth", "--cache-dir", "none", "--no-progress"])
    assert rc == 0


def test_train_reads_the_model_settings_index_reads(shapes: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    # PICTOR_BACKBONE or a config file set for `pictor index` must not be ignored by train.
    monkeypatch.setenv("PICTOR_BACKBONE", "no_such_net")
    rc = main(["train", str(shapes), "--out", str(tmp_path / "m.pt"), "--no-progress"])
    assert rc == 2 and "no_such_net" in capsys.readouterr().err
    monkeypatch.delenv("PICTOR_BACKBONE")
    monkeypatch.setenv("PICTOR_POOLING", "gem")  # the model must fit an index built with it
    rc = main(["train", str(shapes), "--out", str(tmp_path / "m.pt"), "--no-progress",
               "--min-per-class", "3", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0 and load_model(tmp_path / "m.pt").spec.pooling == "gem"
    monkeypatch.delenv("PICTOR_POOLING")
    rc = main(["train", str(shapes), "--out", str(tmp_path / "m.pt"), "--no-progress", "--pooling", "max",
               "--min-per-class", "3", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0 and load_model(tmp_path / "m.pt").spec.pooling == "max"  # also as a flag
    (tmp_path / "c.toml").write_text('batch_size = 0\n')
    rc = main(["eval", str(tmp_path / "m.pt"), str(shapes), "--config", str(tmp_path / "c.toml")])
    assert rc == 2 and "batch_size must be between 1 and 4096, got 0" in capsys.readouterr().err
    # eval embeds with the model's own backbone and pooling: another one set is a mistake to say.
    monkeypatch.setenv("PICTOR_POOLING", "gem")
    rc = main(["eval", str(tmp_path / "m.pt"), str(shapes)])
    assert rc == 2 and "pooling gem (PICTOR_POOLING) set, but the model file" in capsys.readouterr().err
    # compile from a file or the environment shared with index and serve is said not to apply.
    monkeypatch.delenv("PICTOR_POOLING")
    monkeypatch.setenv("PICTOR_COMPILE", "1")
    with caplog.at_level("WARNING", logger="pictor"):
        assert main(["eval", str(tmp_path / "m.pt"), str(shapes)]) == 0
    assert "compile (from PICTOR_COMPILE) applies to `pictor index` and `pictor serve`" in caplog.text


def test_cli_errors_are_clear(tmp_path: Path, shapes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "m.pt")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    rc = main(["train", str(shapes), "--val", str(tmp_path / "empty"), "--out", str(tmp_path / "m.pt")])
    assert rc == 2 and "the validation set (--val): data " in capsys.readouterr().err  # not DATA's fault
    rc = main(["train", str(shapes), "--val", str(tmp_path / "gone"), "--out", str(tmp_path / "m.pt")])
    assert rc == 2 and "the validation set (--val): " in capsys.readouterr().err
    rc = main(["train", str(shapes), "--weight-decays", "", "--out", str(tmp_path / "m.pt")])
    assert rc == 2 and "--weight-decays is empty" in capsys.readouterr().err  # not the default grid
    (tmp_path / "notes.txt").write_text("a file")
    rc = main(["train", str(shapes), "--out", str(tmp_path / "notes.txt" / "m.pt")])
    assert rc == 2 and f"cannot create its folder: {tmp_path / 'notes.txt'} is a file, not a folder" in (
        capsys.readouterr().err)
    for flag in ("--png", "--out-json"):  # nothing written, and nothing said, before
        rc = main(["eval", str(tmp_path / "m.pt"), str(shapes), flag, ""])
        assert rc == 2 and f"{flag} is empty; name a file" in capsys.readouterr().err
    rc = main(["train", str(tmp_path), "--val", str(tmp_path), "--val-fraction", "0.5", "--out", str(tmp_path / "m.pt")])
    assert rc == 2 and "with --val it would be ignored: give one of them" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"not a model")
    rc = main(["eval", str(foreign), str(tmp_path)])
    assert rc == 2 and "not a Pictor model file" in capsys.readouterr().err
    torch.save(torch.nn.Linear(2, 2), foreign)  # a pickled module: refused, in plain text
    rc = main(["eval", str(foreign), str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a pickled torch.nn.modules.linear.Linear, which is not loaded" in err
    assert "weights_only" not in err and "\x1b" not in err  # torch's advice and colours stay out
    long_name = tmp_path / ("m" * 250 + ".pt")  # fits, but the temporary file beside it would not
    rc = main(["train", str(tmp_path), "--out", str(long_name)])
    assert rc == 2 and "cannot write in" in capsys.readouterr().err
    os.mkfifo(tmp_path / "fifo")  # would be replaced by the model file
    rc = main(["train", str(tmp_path), "--out", str(tmp_path / "fifo")])
    assert rc == 2 and "fifo: exists and is not a regular file" in capsys.readouterr().err
    if Path("/proc/self").is_dir():  # where even root cannot make a file: refused before training
        rc = main(["train", str(tmp_path), "--out", "/proc/pictor-model.pt"])
        assert rc == 2 and "--out /proc/pictor-model.pt: cannot write in /proc" in capsys.readouterr().err


def test_eval_reports_unknown_answers_for_other_classes(
    shapes: Path, shapes_index: Path, tmp_path: Path, embedder: CountingEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    model = train(config(tmp_path, weight_decays=(1e-3,)), shapes, embedder=embedder).model
    other = make_tree(tmp_path / "other", per_class=3, seed=5, classes=("disc",))
    (other / "noise").mkdir()
    for i in range(4):  # a class the model never saw, like none of its classes
        pixels = np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(other / "noise" / f"{i}.png")
    report = evaluate(model, other, embedder=embedder, cache_dir=tmp_path / "cache",
                      progress=False)
    # Closed-set metrics cover the model's classes only; without the index, no open-set figure.
    assert report["ignored"] == 4 and report["n"] == 3 and report["top1"] == 1.0
    assert "open_set" not in report
    assert report["training_images"] == report["validation_images"] == 0  # new images, by content
    old_file = dataclasses.replace(model, training_images=torch.zeros(0, dtype=torch.int64),  # made before the ids
                                   validation_images=torch.zeros(0, dtype=torch.int64))
    old_report = evaluate(old_file, other, embedder=embedder, cache_dir=tmp_path / "cache", progress=False)
    assert old_report["training_images"] is old_report["validation_images"] is None  # not known, rather than none
    report = evaluate(model, other, index=shapes_index, embedder=embedder,
                      cache_dir=tmp_path / "cache", progress=False)
    assert report["n"] == 3 and report["top1"] == 1.0
    o = report["open_set"]
    assert o["other_n"] == 4 and set(o["other_per_class"]) == {"noise"}
    assert o["other_unknown"] == 1.0 and o["known_unknown"] == 0.0 and o["top1_served"] == 1.0
    assert [r["unknown"] for r in report["images"] if r["label"] == "noise"] == [True] * 4
    # Only images of other classes: no closed-set figure, the open-set one alone.
    shutil.rmtree(other / "disc")
    report = evaluate(model, other, index=shapes_index, embedder=embedder,
                      cache_dir=tmp_path / "cache", progress=False)
    assert report["n"] == 0 and report["open_set"]["known_n"] == 0
    assert report["top1"] is report["top5"] is report["macro_f1"] is None  # not measured, rather than 0% right
    assert report["open_set"]["other_unknown"] == 1.0
    assert format_report(report).startswith("images of the model's classes: none\n\nopen set")
    plot_confusion(report, str(tmp_path / "none.png"))
    assert (tmp_path / "none.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(InvalidRequestError, match="with --index INDEX"):
        evaluate(model, other, embedder=embedder, cache_dir=tmp_path / "cache", progress=False)
    # A model without open-set thresholds never answers unknown: --index is refused, not ignored.
    closed = dataclasses.replace(model, open_set=None)
    with pytest.raises(InvalidRequestError, match=r"no open-set thresholds \(trained with --no-open-set\)"):
        evaluate(closed, other, index=shapes_index, embedder=embedder, progress=False)
    # A class folder named in other case is another class; the warning says which it would be.
    shutil.copytree(tmp_path / "other" / "noise", other / "Disc")
    caplog.clear()
    evaluate(model, other, index=shapes_index, embedder=embedder, cache_dir=tmp_path / "cache", progress=False)
    assert ("of classes the model does not know are left out of the accuracy: 'Disc', 'noise'; class names are "
            "compared as written, case and digits alike: rename 'Disc' to 'disc'") in caplog.text
    # An index held by another (a server) is the one message: no warnings of the data before it.
    from pictor.core.whitening import open_index

    caplog.clear()
    held = open_index(shapes_index)[0]
    try:
        with pytest.raises(InvalidRequestError, match="is open in another process"):
            evaluate(model, other, index=shapes_index, embedder=embedder, progress=False)
    finally:
        held.close(snapshot=False)
    assert "left out of the accuracy" not in caplog.text


def test_auto_precision_fine_tunes_in_fp32_on_a_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 autocast lost accuracy fine-tuning on a CPU (0.904 vs 0.920 on flowers); it embeds."""
    from pictor.core import embedder as embedder_mod

    monkeypatch.setattr(embedder_mod, "cpu_has_fast_bf16", lambda: True)
    assert build_embedder(config(tmp_path, device="cpu", mode="finetune")).precision == "fp32"
    assert build_embedder(config(tmp_path, device="cpu", mode="linear")).precision == "bf16"
    assert build_embedder(config(tmp_path, device="cpu", mode="finetune", precision="bf16")).precision == "bf16"
