"""The embedding engine on the offline default backbone: real photos, corner cases, precision."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pictor.core.decode import decode_image, load_image
from pictor.core.embedder import (
    Embedder,
    _trim_long_side,
    create_embedder,
    preprocess_image,
    resolve_precision,
)
from pictor.core.spec import ModelSpec, Preprocessing
from pictor.core.whitening import WHITENING_FILE, PCAWhitening
from pictor.errors import IncompatibleModelError, InvalidRequestError, NotFoundError

DATA = Path(__file__).parent / "data"
PHOTOS = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
DAISY = 985  # ImageNet-1k class index of "daisy"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return create_embedder(device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [load_image(DATA / f"{name}.jpg") for name in PHOTOS]


def test_default_is_offline_efficientnet_lite0(embedder: Embedder) -> None:
    spec = embedder.spec
    assert (spec.backbone, spec.weights, spec.dim, spec.pooling) == (
        "efficientnet_lite0", "offline", 1280, "avg")
    p = spec.preprocessing  # timm's pretrained_cfg for tf_efficientnet_lite0
    assert (p.input_size, p.resize_size, p.mean, p.std, p.interpolation) == (
        224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    assert embedder.imagenet_classes is not None and len(embedder.imagenet_classes) == 1000
    assert embedder.imagenet_classes[DAISY] == "daisy"
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert embedder.device == torch.device("cpu")


def test_known_class_photo_is_classified(embedder: Embedder) -> None:
    image = load_image(DATA / "daisy.jpg", draft_size=embedder.draft_size)
    out = embedder.forward_images([image])
    assert out.embeddings.shape == (1, 1280) and out.embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-5)
    assert out.logits is not None and out.logits.shape == (1, 1000)
    assert int(out.logits[0].argmax()) == DAISY


def test_preprocess_matches_the_weights(embedder: Embedder, photos: list[Image.Image]) -> None:
    x = embedder.preprocess(photos[0])
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # mean = std = 0.5


def test_extreme_strip_is_trimmed_before_resizing() -> None:
    # 20000x1: resizing the short side to 256 first would make a 5.1M x 256 image (4 GB).
    x = preprocess_image(Image.new("RGB", (20000, 1), (0, 255, 0)), Preprocessing())
    assert x.shape == (3, 224, 224)
    assert _trim_long_side(Image.new("RGB", (20000, 1))).size == (4, 1)
    assert _trim_long_side(Image.new("RGB", (3, 50))).size == (3, 12)
    # Beyond 4:1 only the centre is kept, and the crop sees the same pixels as without the trim.
    import torchvision.transforms.functional as TF

    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (21, 101, 3), dtype=np.uint8)).resize((1000, 200))
    for image in (wide, wide.transpose(Image.Transpose.TRANSPOSE)):
        ref = TF.center_crop(TF.resize(image, 256), [224, 224])
        ref = (torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1) / 255.0 - 0.485) / 0.229
        assert torch.allclose(preprocess_image(image, Preprocessing())[0], ref[0], atol=1e-5)


def _corner_case_images() -> dict[str, Image.Image]:
    """Each odd input users send, encoded then decoded the way the service does."""
    def enc(im: Image.Image, fmt: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    emoji = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    emoji.paste((255, 200, 0, 255), (16, 16, 48, 48))
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0] + [200, 30, 30] * 255)
    pal.paste(1, (8, 8, 24, 24))
    exif = Image.Exif()
    exif[0x0112] = 8
    frames = [Image.new("RGB", (48, 48), c) for c in ((255, 0, 0), (0, 0, 255))]
    deep = Image.fromarray((np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64))
    photo = (DATA / "daisy.jpg").read_bytes()
    cases = {
        "rgba_emoji": enc(emoji, "PNG"),
        "la": enc(emoji.convert("LA"), "PNG"),
        "palette_transparent_gif": enc(pal, "GIF", transparency=0),
        "cmyk_jpeg": enc(load_image(DATA / "roses.jpg").convert("CMYK"), "JPEG"),
        "gray16_png": enc(deep, "PNG"),
        "gray": enc(load_image(DATA / "tulips.jpg").convert("L"), "JPEG"),
        "bilevel": enc(Image.new("1", (40, 30), 1), "BMP"),
        "animated_gif": enc(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated_webp": enc(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "exif_rotated": enc(Image.open(io.BytesIO(photo)), "JPEG", exif=exif),
        "tiff": enc(load_image(DATA / "sunflowers.jpg"), "TIFF"),
        "one_pixel": enc(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "thin_strip": enc(Image.new("RGB", (1000, 3), (9, 200, 9)), "PNG"),
    }
    return {name: decode_image(data) for name, data in cases.items()}


def test_corner_cases_embed_without_error(embedder: Embedder) -> None:
    images = _corner_case_images()
    out = embedder.forward_images(list(images.values()))
    assert out.embeddings.shape == (len(images), 1280)
    assert np.isfinite(out.embeddings).all()
    assert np.allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-5)
    assert out.logits is not None and np.isfinite(out.logits).all()


def test_what_is_not_a_list_of_images_is_refused(embedder: Embedder) -> None:
    image = next(iter(_corner_case_images().values()))
    with pytest.raises(InvalidRequestError, match=r"got a single image; for one image, write \[image\]"):
        embedder.embed(image)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="images must be decoded PIL images .* got str"):
        embedder.embed(["photo.jpg"])  # type: ignore[list-item]
    for batch, got in ((embedder.preprocess(image), r"shape \[3, 224, 224\]"), (np.zeros((1, 3, 8, 8)), "ndarray")):
        with pytest.raises(InvalidRequestError, match=rf"batch must be a torch tensor \[N, 3, H, W\].* got {got}"):
            embedder.forward_batch(batch)  # type: ignore[arg-type]


def test_batches_match_single_images(photos: list[Image.Image]) -> None:
    small = create_embedder(device="cpu", precision="fp32", batch_size=2)
    batched = small.embed(photos)
    single = np.concatenate([small.embed([im]) for im in photos])
    assert np.allclose(batched, single, atol=1e-4)
    empty = small.forward_images([])
    assert empty.embeddings.shape == (0, 1280) and empty.logits is not None


@pytest.mark.slow  # inductor compiles C++ kernels for a minute or two
def test_compiled_backbone_matches_eager(embedder: Embedder, photos: list[Image.Image]) -> None:
    compiled = create_embedder(device="cpu", precision="fp32", compile=True)
    eager = embedder.forward_images(photos[:2])
    out = compiled.forward_images(photos[:2])
    assert float((out.embeddings * eager.embeddings).sum(1).min()) >= 0.9999
    assert out.logits is not None and eager.logits is not None
    assert (out.logits.argmax(1) == eager.logits.argmax(1)).all()


@pytest.mark.parametrize("pooling", ["max", "gem"])
def test_pooling_choices(embedder: Embedder, pooling: str, photos: list[Image.Image]) -> None:
    other = create_embedder(device="cpu", precision="fp32", pooling=pooling)
    assert other.spec.pooling == pooling and other.spec != embedder.spec
    a, b = embedder.embed(photos[:2]), other.embed(photos[:2])
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(a, b, atol=1e-3)


def test_layer_choice(photos: list[Image.Image]) -> None:
    mid = create_embedder(device="cpu", precision="fp32", layer="blocks.4")
    assert (mid.spec.layer, mid.spec.dim) == ("blocks.4", 112)
    out = mid.forward_images(photos[:1])
    assert out.embeddings.shape == (1, 112) and out.logits is not None
    assert int(out.logits[0].argmax()) == DAISY  # logits still from the full network
    with pytest.raises(InvalidRequestError, match="blocks.6"):
        create_embedder(device="cpu", layer="nope")


def test_bad_arguments() -> None:
    with pytest.raises(InvalidRequestError, match="pooling"):
        create_embedder(pooling="sum")
    with pytest.raises(InvalidRequestError, match="weights must be text, got int"):
        create_embedder(weights=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="device must be text, got NoneType"):
        create_embedder(device=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="precision"):
        resolve_precision("int8", torch.device("cpu"))
    with pytest.raises(NotFoundError, match="resnet50"):
        create_embedder("resnet5O")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidRequestError, match="CUDA"):
            create_embedder(device="cuda")


def test_auto_precision_on_cpu() -> None:
    from pictor.core.embedder import cpu_has_fast_bf16

    want = "bf16" if cpu_has_fast_bf16() else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == want


@pytest.mark.parametrize(("capability", "auto"), [((7, 5), "fp16"), ((8, 0), "bf16")])
def test_auto_precision_on_a_gpu_asks_that_gpu(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                               capability: tuple[int, int], auto: str) -> None:
    # No GPU here: the device's answer is given. A T4 (7.5) emulates bf16, which
    # torch.cuda.is_bf16_supported() counts as support; auto must take fp16 there.
    asked = []

    def device_capability(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", device_capability)
    gpu = torch.device("cuda:1")
    assert resolve_precision("auto", gpu) == auto
    assert asked == [gpu]  # the device in use, not the current one
    with caplog.at_level("WARNING", logger="pictor.core.embedder"):
        assert resolve_precision("bf16", gpu) == "bf16"  # as asked, with a warning where emulated
    assert ("emulated" in caplog.text) == (auto == "fp16")


def test_auto_keeps_the_precision_vectors_were_made_at_where_native(monkeypatch: pytest.MonkeyPatch) -> None:
    from pictor.core import embedder as embedder_mod

    kept = embedder_mod.kept_precision
    monkeypatch.setattr(embedder_mod, "cpu_has_fast_bf16", lambda: False)
    assert kept("auto", "fp32", "cpu") == "fp32"
    assert kept("auto", "bf16", "cpu") == "auto"  # emulated here (17x slower): this device's own pick
    assert kept("auto", None, "cpu") == kept("auto", "auto", "cpu") == "auto"  # not said: as before
    assert kept("fp32", "bf16", "cpu") == "fp32"  # asked for: as asked
    monkeypatch.setattr(embedder_mod, "cpu_has_fast_bf16", lambda: True)
    assert kept("auto", "bf16", "cpu") == "bf16"


def _retrieval_check(fp32: Embedder, reduced: Embedder, photos: list[Image.Image]) -> None:
    """Cosine >= 0.995 to fp32 on real photos, and the same top-1 on a small gallery."""
    queries = [ImageOps.mirror(im).crop((im.width // 10, im.height // 10, im.width,
                                         im.height)) for im in photos]
    g32, g16 = fp32.embed(photos), reduced.embed(photos)
    q32, q16 = fp32.embed(queries), reduced.embed(queries)
    cos = np.concatenate([(g32 * g16).sum(1), (q32 * q16).sum(1)])
    assert cos.min() >= 0.995, cos
    top32, top16 = (q32 @ g32.T).argmax(1), (q16 @ g16.T).argmax(1)
    assert top16.tolist() == top32.tolist() == list(range(len(photos)))


def test_bf16_fidelity_on_cpu(embedder: Embedder, photos: list[Image.Image]) -> None:
    bf16 = create_embedder(device="cpu", precision="bf16")
    assert bf16.precision == "bf16" and bf16.spec == embedder.spec  # same embedding space
    _retrieval_check(embedder, bf16, photos)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_fidelity_on_gpu(precision: str, photos: list[Image.Image]) -> None:
    fp32 = create_embedder(device="cuda", precision="fp32")
    _retrieval_check(fp32, create_embedder(device="cuda", precision=precision), photos)


def test_pca_whitening_round_trip() -> None:
    rng = np.random.default_rng(0)
    # Correlated embeddings: a few strong directions, as CNN features have.
    x = rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) + 3.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pca = PCAWhitening.fit(x, out_dim=16)
    y = pca.apply(x)
    assert y.shape == (300, 16) and y.dtype == np.float32
    assert np.allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    raw = (x - pca.mean) @ pca.projection  # whitened before renorm: ~identity covariance
    assert np.allclose(np.cov(raw, rowvar=False), np.eye(16), atol=0.05)
    with pytest.raises(InvalidRequestError, match="expects"):
        pca.apply(x[:, :8])
    with pytest.raises(InvalidRequestError, match="sample"):
        PCAWhitening.fit(x[:1])


def test_pca_whitening_file_and_spec(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 32)).astype(np.float32)
    pca = PCAWhitening.fit(x, out_dim=8)
    raw = ModelSpec(backbone="b", weights="w", dim=32)
    spec = pca.whiten_spec(raw)
    assert (spec.dim, spec.whitening) == (8, pca.fingerprint) and pca.fingerprint.startswith("pca8:")
    assert ModelSpec.from_dict(spec.to_dict()) == spec and "whitening" not in raw.to_dict()
    assert pca.unwhiten_spec(spec) == raw
    assert PCAWhitening.load(tmp_path, raw) is None  # unwhitened: nothing to load
    with pytest.raises(IncompatibleModelError, match="missing"):
        PCAWhitening.load(tmp_path, spec)
    pca.save(tmp_path)
    loaded = PCAWhitening.load(tmp_path, spec)
    assert loaded is not None and np.array_equal(loaded.apply(x), pca.apply(x))
    good = (tmp_path / WHITENING_FILE).read_bytes()
    for damaged in (good[:100], good[:-10], b"\0" * len(good)):
        (tmp_path / WHITENING_FILE).write_bytes(damaged)
        with pytest.raises(IncompatibleModelError, match="missing or unreadable"):
            PCAWhitening.load(tmp_path, spec)
    PCAWhitening.fit(x[::-1][:50], out_dim=8).save(tmp_path)  # another transform in its place
    with pytest.raises(IncompatibleModelError, match="rebuild"):
        PCAWhitening.load(tmp_path, spec)
    with pytest.raises(IncompatibleModelError, match="whitened already"):
        pca.whiten_spec(spec)
