"""Head, model file and kNN vote (pictor.core.head), without a backbone."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pictor.core.embedder import fingerprint_state
from pictor.core.head import KNN_TEMPERATURE, ClassifierHead, TrainedModel, content_ids, knn_vote, load_model
from pictor.core.open_set import ClassGaussians, OpenSet, OpenSetThresholds
from pictor.core.spec import ModelSpec
from pictor.errors import IncompatibleModelError, InvalidRequestError, NotFoundError

SPEC = ModelSpec(backbone="efficientnet_lite0", weights="offline", dim=8)


@dataclass
class FakeHit:  # the shape of pictor.core.store.Hit that knn_vote reads
    label: str
    score: float
    key: str = ""


def make_model(spec: ModelSpec = SPEC, classes: int = 3, **kw: object) -> TrainedModel:
    torch.manual_seed(0)
    head = ClassifierHead(spec.dim, classes)
    head.set_standardization(torch.randn(20, spec.dim))
    return TrainedModel(
        spec=spec,
        class_names=[f"c{i}" for i in range(classes)],
        head=head,
        **kw,  # type: ignore[arg-type]
    )


def make_open_set(classes: int = 3) -> OpenSet:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(classes, SPEC.dim)) + 0.3 * rng.normal(size=(12, classes, SPEC.dim))
    return OpenSet(ClassGaussians.fit(x.reshape(-1, SPEC.dim), np.tile(np.arange(classes), 12), classes),
                   OpenSetThresholds(0.55, 0.42))


# ---- kNN vote


def test_knn_vote_weighted_sums_to_one_and_ranks() -> None:
    hits = [FakeHit("a", 0.9), FakeHit("b", 0.86), FakeHit("b", 0.85), FakeHit("a", 0.1)]
    vote = knn_vote(hits)
    assert [lab for lab, _ in vote] == ["b", "a"]  # two close ones outweigh a slightly closer one
    assert sum(s for _, s in vote) == pytest.approx(1.0)
    w = [math.exp(s / KNN_TEMPERATURE) for s in (0.9, 0.86, 0.85, 0.1)]
    assert vote[0][1] == pytest.approx((w[1] + w[2]) / sum(w))


def test_knn_vote_an_indexed_copy_outvotes_middling_neighbours() -> None:
    # A query that is itself indexed (similarity 1) among nine neighbours of another label at
    # 0.7: weights proportional to similarity gave 1 against 6.3.
    vote = knn_vote([FakeHit("cat", 1.0)] + [FakeHit("frog", 0.7)] * 9)
    assert vote[0][0] == "cat" and vote[0][1] > 0.85


def test_knn_vote_majority_and_tie_break_by_best_neighbour() -> None:
    hits = [FakeHit("a", 0.5), FakeHit("b", 0.9), FakeHit("a", 0.2), FakeHit("b", 0.1)]
    vote = knn_vote(hits, weighted=False)
    assert vote == [("b", 0.5), ("a", 0.5)]  # 2 votes each; b has the closest neighbour


def test_knn_vote_ignores_unlabelled_and_handles_empty() -> None:
    assert knn_vote([]) == []
    assert knn_vote([FakeHit("", 0.99)]) == []
    vote = knn_vote([FakeHit("", 0.99), FakeHit("x", 0.2)])
    assert vote == [("x", 1.0)]


def test_knn_vote_negative_similarities_still_weigh_by_closeness() -> None:
    vote = knn_vote([FakeHit("a", -0.2), FakeHit("a", -0.1), FakeHit("b", -0.05)])
    assert vote[0][0] == "b"  # the closest, by far enough at this temperature


# ---- head and model file


def test_predict_proba_shape_and_rows_sum_to_one() -> None:
    model = make_model()
    probs = model.predict_proba(np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32))
    assert probs.shape == (4, 3) and probs.dtype == np.float64  # float32 zeroes (and unranks) a far tail
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    top = model.top_k(np.zeros((1, 8), np.float32), k=2)[0]
    assert len(top) == 2 and top[0][1] >= top[1][1]


def test_predict_proba_refuses_wrong_dim() -> None:
    with pytest.raises(IncompatibleModelError, match=r"\[N, 8\]"):
        make_model().predict_proba(np.zeros((2, 5), np.float32))


def test_model_file_round_trip(tmp_path) -> None:
    state = {"blocks.6.0.conv.weight": torch.randn(4, 4)}
    spec = dataclasses.replace(SPEC, finetune=fingerprint_state(state))
    open_set = make_open_set()
    model = make_model(
        spec,
        temperature=0.7,
        open_set=open_set,
        metrics={"top1": np.float64(0.9), "sweep": [{"wd": 1e-3}]},
        training={"mode": "finetune", "epochs": 1},
        data_fingerprint="abc",
        backbone_state=state,
        training_images=content_ids(["ab" * 32, "cd" * 32]),
        validation_images=content_ids(["ef" * 32]),
    )
    path = tmp_path / "m.pt"
    model.save(path)
    raw = torch.load(path, weights_only=True)  # plain containers only
    assert raw["format_version"] == 1 and raw["spec"]["dim"] == 8
    back = load_model(path)
    assert back.spec == spec
    assert back.class_names == model.class_names
    assert back.open_set is not None and back.open_set.thresholds == OpenSetThresholds(0.55, 0.42)
    assert back.temperature == pytest.approx(0.7)
    assert back.metrics["top1"] == pytest.approx(0.9)
    assert back.training["mode"] == "finetune" and back.data_fingerprint == "abc"
    assert back.trained_on(["cd" * 32, "ef" * 32]).tolist() == [True, False]
    assert back.validated_on(["cd" * 32, "ef" * 32]).tolist() == [False, True]
    assert {"torch", "numpy", "python"} <= set(back.versions)
    name = "blocks.6.0.conv.weight"
    torch.testing.assert_close(back.backbone_state[name], state[name])
    x = np.random.default_rng(2).normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_allclose(back.predict_proba(x), model.predict_proba(x), rtol=1e-6)
    np.testing.assert_allclose(back.open_set.gaussians.score(x),
                               open_set.gaussians.score(x), rtol=1e-6)


def test_model_file_with_old_open_set_rule_loads_without_it(tmp_path, caplog) -> None:
    old = tmp_path / "old.pt"
    d = make_model().to_dict()
    del d["open_set"]
    torch.save(d | {"thresholds": {"head_confidence": 0.9, "neighbor_similarity": 0.5}}, old)
    assert load_model(old).open_set is None
    assert "older rule" in caplog.text
    other = tmp_path / "other.pt"
    torch.save(make_model(open_set=make_open_set()).to_dict()
               | {"open_set": make_open_set().to_dict() | {"score": "energy"}}, other)
    with pytest.raises(IncompatibleModelError, match="energy"):
        load_model(other)


def test_model_refuses_open_set_for_other_classes() -> None:
    with pytest.raises(IncompatibleModelError, match="open-set Gaussians"):
        make_model(classes=2, open_set=make_open_set())


def test_load_model_refuses_missing_foreign_and_damaged_files(tmp_path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(InvalidRequestError, match="is a folder, not a model file"):  # `eval DATA MODEL`
        load_model(tmp_path)
    os.mkfifo(tmp_path / "pipe.pt")  # reading it would wait for a writer; it exists, so not "missing"
    for special in (tmp_path / "pipe.pt", Path("/dev/null")):
        with pytest.raises(InvalidRequestError, match=f"^{special} is not a regular file, not a model file"):
            load_model(special)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(IncompatibleModelError, match="not a Pictor model"):
        load_model(foreign)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(IncompatibleModelError, match="not a Pictor model file .*: not a PyTorch file"):
        load_model(junk)
    pickled = tmp_path / "pickled.pt"  # a plain pickle: refused without torch's protocol warning first
    pickled.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        with pytest.raises(IncompatibleModelError, match="not a Pictor model file"):
            load_model(pickled)
    assert not warned, [str(w.message) for w in warned]
    # A real model file with bytes flipped in a tensor: torch.load took it, with a changed weight.
    good = tmp_path / "good.pt"
    make_model(open_set=make_open_set()).save(good)
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        largest = max((m for m in archive.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)
        tensor_at = data.index(archive.read(largest)) + largest.file_size // 2
    data[tensor_at : tensor_at + 8] = bytes(b ^ 0xFF for b in data[tensor_at : tensor_at + 8])
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(IncompatibleModelError, match=r"model file .*flipped.pt is damaged \(.* fails its checksum\)"):
        load_model(flipped)
    # A flipped bit in the archive's directory (the "encrypted" flag, the compression method)
    # failed the zip reader with its own errors, as a traceback.
    directory = good.read_bytes().index(b"PK\x01\x02")
    for at in (directory + 8, directory + 10):
        data = bytearray(good.read_bytes())
        data[at] ^= 1
        flipped.write_bytes(bytes(data))
        with pytest.raises(IncompatibleModelError, match=r"is damaged \(its archive cannot be read: "):
            load_model(flipped)
    for cut in (100, len(data) // 3, len(data) - 10):  # a cut file: torch raised an OSError at some lengths
        (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:cut])
        with pytest.raises(IncompatibleModelError, match="not a Pictor model file .*damaged"):
            load_model(tmp_path / "cut.pt")
    full = tmp_path / "full.pt"  # a whole pickled network instead of a model file
    torch.save(torch.nn.Linear(2, 2), full)
    with pytest.raises(IncompatibleModelError, match=r"holds a pickled torch.nn.modules.linear.Linear, which is not"):
        load_model(full)

    class Evil:  # a pickle that would run code is refused by weights_only
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "pictor.model", "x": Evil()}, evil)
    with pytest.raises(IncompatibleModelError, match="not a Pictor model") as refused:
        load_model(evil)
    assert "weights_only" not in str(refused.value)  # torch's advice would run the code
    newer = tmp_path / "newer.pt"
    d = make_model().to_dict() | {"format_version": 99}
    torch.save(d, newer)
    with pytest.raises(IncompatibleModelError, match="version 99"):
        load_model(newer)
    for field in ("versions", "open_set", "metrics"):  # a field of another type: no AttributeError
        odd = tmp_path / f"odd-{field}.pt"
        torch.save(make_model(open_set=make_open_set()).to_dict() | {field: "text"}, odd)
        with pytest.raises(IncompatibleModelError, match=f"odd-{field}.pt is a damaged Pictor model file"):
            load_model(odd)


def test_model_refuses_head_that_does_not_fit_spec() -> None:
    with pytest.raises(IncompatibleModelError, match="8-d"):
        TrainedModel(
            spec=dataclasses.replace(SPEC, dim=16),
            class_names=["a", "b"],
            head=ClassifierHead(8, 2),
        )
    with pytest.raises(IncompatibleModelError, match="3 class names"):
        TrainedModel(spec=SPEC, class_names=["a", "b", "c"], head=ClassifierHead(8, 2))


def test_check_index_refuses_other_dim_backbone_or_plain_backbone() -> None:
    model = make_model()
    model.check_index(SPEC)  # same space: fine
    with pytest.raises(IncompatibleModelError, match="dim=16"):
        model.check_index(dataclasses.replace(SPEC, dim=16))
    with pytest.raises(IncompatibleModelError, match="resnet50"):
        model.check_index(dataclasses.replace(SPEC, backbone="resnet50"))
    state = {"w": torch.ones(2)}
    tuned_spec = dataclasses.replace(SPEC, finetune=fingerprint_state(state))
    tuned = make_model(tuned_spec, backbone_state=state)
    with pytest.raises(IncompatibleModelError, match="pictor index GALLERY --model MODEL"):
        tuned.check_index(SPEC)


def test_backbone_state_must_match_fingerprint() -> None:
    with pytest.raises(IncompatibleModelError, match="fingerprint"):
        spec = dataclasses.replace(SPEC, finetune="deadbeef")
        make_model(spec, backbone_state={"w": torch.ones(2)})


@pytest.mark.parametrize(("trained", "native_bf16", "served"), [
    ("fp32", True, "fp32"),  # a model fitted in fp32 stays in fp32 on a bf16 machine
    ("bf16", True, "bf16"),
    ("bf16", False, "fp32"),  # emulated bf16 would be slower: fp32, with a warning
])
def test_served_precision_follows_the_model(trained: str, native_bf16: bool, served: str,
                                            monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from pictor.core import embedder as embedder_mod

    monkeypatch.setattr(embedder_mod, "cpu_has_fast_bf16", lambda: native_bf16)
    spec = embedder_mod.create_embedder("efficientnet_lite0", device="cpu", precision="fp32").spec
    model = make_model(spec, training={"precision": trained})
    assert model.create_embedder(device="cpu").precision == served
    assert ("calibrated on bf16 embeddings, which are computed in fp32 here" in caplog.text) == (trained != served)
    assert model.create_embedder(device="cpu", precision="fp32").precision == "fp32"  # asked for: kept


def test_a_full_disk_is_said_when_the_model_file_is_written(tmp_path, monkeypatch) -> None:
    import errno

    from pictor.core import head
    from pictor.errors import ResourceExhaustedError

    def full(obj: object, f: object) -> None:  # as torch.save fails: its own error, the OSError its context
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4368") from None

    monkeypatch.setattr(head.torch, "save", full)
    with pytest.raises(ResourceExhaustedError, match="m.pt: the disk is full; free space and train again"):
        make_model().save(tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []  # no half file, no temporary
    # What a run killed while it wrote the file left beside it goes with the next save.
    from conftest import dead_pid

    monkeypatch.undo()
    (tmp_path / f"m.pt.{dead_pid()}.tmp").write_bytes(b"half")
    make_model().save(tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
