"""`pictor serve --model`: Classify answers with a trained head, alone or with the kNN vote."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shutil
import signal
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ServerProcess, free_port, pictor, wait_until
from PIL import Image, ImageDraw

from pictor.client import PictorClient
from pictor.errors import InvalidRequestError


def tinted(seed: int, hue: str) -> bytes:
    """A 64 px picture whose shapes are all reddish, all greenish or all bluish."""
    rng = random.Random(seed)
    def colour() -> tuple[int, int, int]:
        hi, lo = rng.randrange(170, 256), rng.randrange(0, 80)
        return {"red": (hi, lo, lo), "green": (lo, hi, lo), "blue": (lo, lo, hi)}[hue]
    im = Image.new("RGB", (64, 64), (245, 245, 245))
    draw = ImageDraw.Draw(im)
    for _ in range(3):
        x, y = rng.randrange(40), rng.randrange(40)
        draw.ellipse([x, y, x + rng.randrange(12, 24), y + rng.randrange(12, 24)], fill=colour())
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def noise(seed: int) -> bytes:
    """A 64 px picture of green noise: like neither class."""
    rng = random.Random(seed)
    im = Image.new("RGB", (64, 64))
    im.putdata([(rng.randrange(60), rng.randrange(120, 256), rng.randrange(60)) for _ in range(64 * 64)])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("model")
    data = root / "data"
    for hue in ("red", "blue"):
        (data / hue).mkdir(parents=True)
        for i in range(10):
            (data / hue / f"{i}.png").write_bytes(tinted(i, hue))
    model = root / "model.pt"
    # In fp32 on every machine (the server keeps the precision they were made at): on one with
    # AMX, where `auto` is bf16, a head trained on these 16 small pictures' bf16 embeddings got
    # 18 of 20 new ones right against 20 in fp32 (standardising near-constant features magnifies
    # bf16's rounding). Real photos do not show it (flowers: linear 0.904 in either precision).
    pictor("train", str(data), "--out", str(model), "--cache-dir", str(root / "cache"), "--no-progress",
           "--precision", "fp32")
    index = root / "index"
    pictor("index", str(data), "--out", str(index), "--model", str(model), "--no-progress", "--precision", "fp32")
    return model, index


def test_classify_with_head_and_knn(trained: tuple[Path, Path]) -> None:
    from pictor.core.head import load_model

    model, index = trained
    server = ServerProcess(index, "--model", str(model)).start()
    try:
        with PictorClient(server.target) as client:
            info = client.info()
            assert info.classifier == "head"
            assert sorted(info.class_names) == ["blue", "red"]
            assert server.proc is not None  # (the pid to send SIGHUP to, and the classes, in the serving line)
            assert re.search(rf" serving \S+ on \S+ \(pid {server.proc.pid}; .* head classifier of 2 classes "
                             r"\['(blue|red)', '(blue|red)'\]\)", server.read_log())
            # The rule with the model's thresholds, as `pictor train` printed it.
            open_set = load_model(model).open_set
            assert open_set is not None
            rule = open_set.thresholds
            assert info.open_set == f"on: {rule.describe()}"
            assert f"class fit < {rule.class_fit:.3f} and nearest neighbour similarity < " in info.open_set
            r = client.classify(tinted(100, "red"), top_k=2)
            assert (r.source, r.labels[0].name, len(r.labels)) == ("head", "red", 2)
            assert r.agree is None  # no kNN vote asked for: nothing compared
            both = client.classify(tinted(101, "blue"), classifier="all", neighbors=5)
            assert both.labels[0].name == "blue"
            assert both.knn_labels[0].name == "blue"
            assert both.agree is True
            assert len(both.neighbors) == 5
            assert not both.unknown
            # The evidence comes along, known or not: a known image's nearest item is its class's.
            assert both.open_set is not None and both.open_set.reason == ""
            assert both.open_set.nearest_similarity == pytest.approx(both.neighbors[0].score, abs=1e-5)
            # Far from both classes and from every indexed image: answered "unknown", whichever
            # classifier answers (the kNN vote names a class all the same), saying which test failed.
            far = client.classify(noise(0), classifier="all")
            assert far.unknown and far.open_set is not None
            assert re.fullmatch(r"(class fit -?[\d.]+ < -?[\d.]+ and )?nearest indexed item of the model's classes "
                                r"at similarity -?[\d.]+ < -?[\d.]+.*", far.open_set.reason)
            assert far.open_set.class_fit < both.open_set.class_fit
            knn = client.classify(noise(0), classifier="knn")
            assert knn.source == "knn" and knn.labels and knn.unknown
            assert not client.classify(tinted(101, "blue"), classifier="knn").unknown
    finally:
        server.stop()


def test_head_gets_unwhitened_embeddings_on_a_whitened_index(trained: tuple[Path, Path]) -> None:
    from pictor.config import ServerSettings
    from pictor.server.engine import Engine

    model, index = trained
    whitened = index.parent / "whitened"
    data = index.parent / "data"
    pictor("index", str(data), "--out", str(whitened), "--model", str(model), "--pca-whiten", "8",
           "--no-progress")
    engine = Engine.load(ServerSettings(index=str(whitened), model=str(model), device="cpu"))
    try:
        r = engine.classify(tinted(102, "red"), classifier="all", neighbors=5)
        assert (r.source, r.labels[0][0], r.knn_labels[0][0]) == ("head", "red", "red")
        assert engine.info().embedding_dim == 8
        assert engine.info().open_set.startswith("class fit alone: the index is PCA-whitened")
        # Whitened similarities are not what the neighbour threshold was calibrated on: the
        # class fit alone still answers "unknown" for a picture like neither class.
        far = engine.classify(noise(0), classifier="all")
        assert far.unknown and far.open_set is not None and far.open_set.nearest_similarity is None
        assert far.open_set.reason.endswith("judged alone (no comparable neighbours in the index)")
    finally:
        engine.close()


def test_open_set_ignores_an_index_without_the_model_classes(trained: tuple[Path, Path],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from pictor.config import ServerSettings
    from pictor.core.store import Item
    from pictor.server.engine import Engine

    model, index = trained
    unlabelled = index.parent / "unlabelled"
    pictor("index", str(index.parent / "data"), "--out", str(unlabelled), "--model", str(model),
           "--labels", "none", "--no-progress")
    engine = Engine.load(ServerSettings(index=str(unlabelled), model=str(model), device="cpu"))
    try:
        # Its neighbours say nothing about the model's classes: the class fit decides alone.
        assert "holds no item labelled with the model's classes" in caplog.text
        assert engine.classify(noise(0), classifier="all").unknown
        red_unknown = [engine.classify(tinted(i, "red"), classifier="all").unknown for i in range(10)]
        assert sum(red_unknown) <= 2  # the model's own red images (budget 5% of known, tiny model)
        assert engine.model is not None and engine.model.open_set is not None
        alone = f"unknown when class fit < {engine.model.open_set.thresholds.class_fit_alone:.3f}"
        assert engine.info().open_set == ("class fit alone: the index holds no item labelled "
                                          f"with the model's classes (yet); {alone}")
        # No item has a label: no image can get a kNN vote, said so (not an empty answer).
        assert not engine.store.has_labels()
        with pytest.raises(InvalidRequestError, match="no item of this index has a label: index labelled images .*"
                                                      "or ask for the default classifier"):
            engine.classify(tinted(0, "red"), classifier="knn")
        # Labelled items upserted into the running server turn the neighbour tests on, once
        # every class has some: with reds alone, every blue image would look far.
        engine.upsert([Item("red/new", label="red")], [tinted(104, "red")], [None])
        assert engine.info().open_set == ("class fit alone: the index holds no item of the "
                                          f"model's class(es) blue (yet); {alone}")
        engine.upsert([Item("blue/new", label="blue")], [tinted(104, "blue")], [None])
        assert engine.info().open_set.startswith("on: unknown when ")
        engine.delete(["blue/new"])  # the last blue item gone: off again
        assert engine.info().open_set.endswith(f"class(es) blue (yet); {alone}")
        engine.upsert([Item("blue/new", label="blue")], [tinted(104, "blue")], [None])
        assert engine.info().open_set.startswith("on: unknown when ")
        # Relabelling leaves the size as it was and still takes the last blue item away.
        engine.upsert([Item("blue/new", label="other")], [tinted(104, "blue")], [None])
        assert engine.info().open_set.endswith(f"class(es) blue (yet); {alone}")
    finally:
        engine.close()


def test_open_set_compares_with_the_model_classes_only(trained: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    """Indexed items of other labels are no evidence of fitting the model's classes: green
    noise next to indexed green noise is still unknown to a red/blue model."""
    from pictor.config import ServerSettings
    from pictor.core.store import Item
    from pictor.server.engine import Engine

    model, index = trained
    mixed = tmp_path / "mixed"
    pictor("index", str(index.parent / "data"), "--out", str(mixed), "--model", str(model),
           "--no-progress")
    engine = Engine.load(ServerSettings(index=str(mixed), model=str(model), device="cpu"))
    try:
        greens = [Item(f"green/{i}", label="green") for i in range(10, 16)]
        engine.upsert(greens, [noise(i) for i in range(10, 16)], [None] * len(greens))
        r = engine.classify(noise(0), classifier="all", neighbors=3)
        assert [label for label, _ in r.knn_labels] == ["green"]  # its neighbours are green
        assert r.unknown
        assert not engine.classify(tinted(103, "red"), classifier="all").unknown
    finally:
        engine.close()


def test_sighup_serves_the_model_file_as_it_is_now(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """A head trained again with a class more is served after SIGHUP, without a restart; a file
    that cannot be served (damaged, or a head for other embeddings) leaves the old one serving."""
    model, index = trained
    data = tmp_path / "data"
    shutil.copytree(index.parent / "data", data)
    (data / "green").mkdir()
    for i in range(10):
        (data / "green" / f"{i}.png").write_bytes(tinted(i, "green"))
    served = tmp_path / "served.pt"
    shutil.copy(model, served)
    cache = str(index.parent / "cache")  # the red and blue images' embeddings are there
    fp32 = ("--precision", "fp32")  # (as the fixture's, on every machine)
    pictor("train", str(data), "--out", str(tmp_path / "three.pt"), "--cache-dir", cache, "--no-progress", *fp32)
    pictor("train", str(data), "--out", str(tmp_path / "max.pt"), "--pooling", "max", "--cache-dir", cache,
           "--no-progress", *fp32)
    metrics_port = free_port()
    server = ServerProcess(index, "--model", str(served), "--metrics-port", str(metrics_port)).start()
    proc = server.proc
    assert proc is not None
    try:
        with PictorClient(server.target) as client, ThreadPoolExecutor(2) as pool:
            assert client.info().model_sha256 == hashlib.sha256(served.read_bytes()).hexdigest()
            assert sorted(client.info().class_names) == ["blue", "red"]
            # Calls go on through the reload: none fails, and each answers with one model or the other.
            swapped = threading.Event()
            def classify_until_swapped() -> set[int]:
                seen = set()
                while not swapped.is_set():
                    seen.add(len(client.classify(tinted(300, "red"), top_k=3).labels))
                return seen
            calls = [pool.submit(classify_until_swapped) for _ in range(2)]
            try:
                os.replace(tmp_path / "three.pt", served)  # as a deployment swaps in a new file
                proc.send_signal(signal.SIGHUP)
                wait_until(lambda: len(client.info().class_names) == 3)
            finally:  # (else a failure here leaves the callers calling, and the test hangs)
                swapped.set()
            assert set.union(*(c.result() for c in calls)) <= {2, 3}
            assert "SIGHUP: serving the model" in server.read_log()
            assert len(client.classify(tinted(300, "red"), top_k=3).labels) == 3
            three = hashlib.sha256(served.read_bytes()).hexdigest()  # what `sha256sum` prints
            assert client.info().model_sha256 == three
            assert f"model:        sha256 {three} (the --model file served" in pictor("info", "--target", server.target).stdout
            assert client.classify(tinted(200, "green")).labels[0].name == "green"
            # The index holds no green item: the neighbour tests are off for this model, and said so.
            assert client.info().open_set.startswith("class fit alone")

            def refused(content: bytes, why: str) -> None:
                unchanged = "SIGHUP: the model served is unchanged"
                before = server.read_log().count(unchanged)
                served.write_bytes(content)
                proc.send_signal(signal.SIGHUP)
                wait_until(lambda: server.read_log().count(unchanged) > before)
                assert why in server.read_log().rsplit(unchanged, 1)[1]
                assert sorted(client.info().class_names) == ["blue", "green", "red"]
                assert client.info().model_sha256 == three
                assert client.classify(tinted(201, "green")).labels[0].name == "green"

            refused(b"half a file", "is not a Pictor model file")
            refused((tmp_path / "max.pt").read_bytes(), "the model's head expects embeddings from")
        assert "Traceback" not in server.read_log()
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'pictor_model_reloads_total{result="served"} 1.0' in scraped
        assert 'pictor_model_reloads_total{result="refused"} 2.0' in scraped
    finally:
        stopped = server.stop()
    assert stopped == 0


def test_refused_start_releases_the_index(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from pictor.config import ServerSettings
    from pictor.core.store import IndexStore
    from pictor.errors import IncompatibleModelError
    from pictor.server.engine import Engine

    _, index = trained
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model file")
    with pytest.raises(IncompatibleModelError, match="broken.pt"):
        Engine.load(ServerSettings(index=str(index), model=str(broken), device="cpu"))
    IndexStore.open(index).close()  # would fail while the refused engine held its lock


def test_index_from_a_checkpoint_serves_with_its_path(gallery: Path, tmp_path: Path) -> None:
    import torch
    import torchvision

    from pictor.config import ServerSettings
    from pictor.core.store import Item
    from pictor.errors import IncompatibleModelError
    from pictor.server.engine import Engine

    # A fine-tuned network saved without its ImageNet classifier: an index of embeddings only.
    sd = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save(sd, tmp_path / "mine.pth")
    index = tmp_path / "index"
    pictor("index", str(gallery), "--out", str(index), "--backbone", "resnet18",
           "--weights", str(tmp_path / "mine.pth"))
    # The index keeps the checkpoint's hash, not its path: serve asks for it ...
    with pytest.raises(InvalidRequestError, match="local checkpoint .* give its path with --weights"):
        Engine.load(ServerSettings(index=str(index), device="cpu"))
    # ... not a weights tag (said at once, not after looking for the tag's weights) ...
    with pytest.raises(InvalidRequestError, match="local checkpoint .*, not 'IMAGENET1K_V1'; give its path"):
        Engine.load(ServerSettings(index=str(index), device="cpu", weights="IMAGENET1K_V1"))
    # ... and refuses another file.
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "other.pth")
    with pytest.raises(IncompatibleModelError, match="the model of --weights"):
        Engine.load(ServerSettings(index=str(index), device="cpu", weights=str(tmp_path / "other.pth")))
    engine = Engine.load(ServerSettings(index=str(index), device="cpu", weights=str(tmp_path / "mine.pth")))
    try:
        image = sorted(gallery.rglob("*.png"))[0]
        assert engine.search(image=image.read_bytes(), k=1)[0].key == image.as_posix()
        # Neither a head nor ImageNet labels: Classify answers with the index's labels.
        assert engine.info().classifier == "knn"
        result = engine.classify(image.read_bytes())
        assert result.source == "knn" and result.labels[0][0] in {"warm", "cool"}
        with pytest.raises(InvalidRequestError, match=r"no classifier head .*; ask for the kNN vote over the index \(CLASSIFIER_KNN: `pictor classify --classifier knn`\)$"):
            engine.classify(image.read_bytes(), classifier="head")
        # Labels taken off every item: no image can get a vote, and Classify says so, but
        # `all` still answers with the neighbours.
        stored = engine.get([it.key for it in engine.list_items("", 1000, None).items], vectors=True)
        assert stored.vectors is not None
        engine.upsert([Item(it.key) for it in stored.items], [None] * len(stored.items), list(stored.vectors))
        with pytest.raises(InvalidRequestError, match="no item of this index has a label: .*`pictor add --label`\\)$"):
            engine.classify(image.read_bytes())
        every = engine.classify(image.read_bytes(), classifier="all")
        assert every.labels == [] and every.neighbors[0].key == image.as_posix()
        with pytest.raises(InvalidRequestError, match="no classifier head .*; label the index's items for a kNN vote"):
            engine.classify(image.read_bytes(), classifier="head")
    finally:
        engine.close()
