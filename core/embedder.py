"""The embedding engine: image -> preprocess -> backbone -> pool -> L2 norm (+ ImageNet logits).

Search and classification share one forward pass: the pooled feature map, L2-normalised, is
the embedding; the backbone's own classifier gives the ImageNet logits. The ``ModelSpec`` of
an ``Embedder`` names everything that decides where an image lands (backbone, weights, layer,
pooling, preprocessing), so an index can refuse vectors from another embedding space.

Example::

    from pictor.core.decode import load_image
    from pictor.core.embedder import create_embedder

    emb = create_embedder()  # efficientnet_lite0, offline ImageNet weights
    out = emb.forward_images([load_image("daisy.jpg", draft_size=emb.draft_size)])
    out.embeddings.shape  # (1, 1280), unit norm
    emb.imagenet_classes[out.logits[0].argmax()]  # 'daisy'
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pictor.config import DEFAULT_BACKBONE, POOLINGS, PRECISIONS
from pictor.core.backbones import Backbone, create_backbone
from pictor.core.spec import ModelSpec, Preprocessing
from pictor.errors import IncompatibleModelError, InvalidRequestError, WeightsUnavailableError
from pictor.iterators import batched

log = logging.getLogger(__name__)

GEM_P = 3.0  # the usual GeM exponent for retrieval (Radenović et al.)
MAX_ASPECT = 4  # preprocessing trims a longer side beyond this ratio (the crop never sees it)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EmbedOutput:
    """One forward pass: ``embeddings`` [N, dim] float32 unit-norm; ``logits`` [N, 1000] or None."""

    embeddings: np.ndarray
    logits: np.ndarray | None


class Embedder:
    """A backbone on a device, with its pooling, precision and preprocessing. Thread-safe for
    inference: nothing changes it once it serves (fine-tuned tensors and ``compile_backbone``
    come before). Build it with ``create_embedder``."""

    def __init__(self, backbone: Backbone, *, device: torch.device, precision: str,
                 pooling: str, batch_size: int = 32, compile: bool = False) -> None:
        # Module.to takes device and memory_format together; torch's stub overloads have one or the other.
        self.backbone: Backbone = backbone.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.device = device
        self.precision = precision
        self.pooling = pooling
        self.batch_size = batch_size
        self.spec = ModelSpec(
            backbone=backbone.info.name,
            weights=backbone.weights,
            dim=backbone.dim,
            pooling=pooling,
            layer=backbone.layer,
            preprocessing=backbone.preprocessing,
        )
        self.imagenet_classes: list[str] | None = backbone.classes
        self._forward: Any = backbone
        if compile:
            self.compile_backbone()

    def compile_backbone(self) -> None:
        """Run the backbone through ``torch.compile`` from now on (compiled at the first batch;
        later weight changes made in place, e.g. fine-tuned tensors, are seen)."""
        self._forward = torch.compile(self.backbone)

    @property
    def draft_size(self) -> tuple[int, int]:
        """Pass to ``decode_image(draft_size=...)``: JPEGs are decoded no smaller than needed."""
        s = self.spec.preprocessing.resize_size
        return (s, s)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> normalised [3, H, W] float tensor as the weights expect (resize the
        shorter side, centre crop, mean/std)."""
        if not isinstance(image, Image.Image):  # (a path or bytes failed deep in torchvision)
            raise InvalidRequestError(f"images must be decoded PIL images (pictor.core.decode.load_image "
                                      f"reads a file), got {type(image).__name__}")
        return preprocess_image(image, self.spec.preprocessing)

    def embed_tensor(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A preprocessed batch [N, 3, H, W] -> (unit embeddings [N, dim], ImageNet logits or
        None), on the device. Differentiable: fine-tuning trains through this same path."""
        x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            fmap, logits = self._forward(x)
        pooled = self.backbone.pooled_head(pool_features(fmap.float(), self.pooling))
        return F.normalize(pooled, dim=1), logits

    def forward_batch(self, batch: torch.Tensor) -> EmbedOutput:
        """Embed an already preprocessed batch [N, 3, H, W] in one forward pass."""
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            got = f"shape {list(batch.shape)}" if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise InvalidRequestError(f"batch must be a torch tensor [N, 3, H, W] (torch.stack of preprocess "
                                      f"outputs), got {got}")
        with torch.inference_mode():
            emb, logits = self.embed_tensor(batch)
            return EmbedOutput(
                embeddings=emb.cpu().numpy(),
                logits=None if logits is None else logits.float().cpu().numpy(),
            )

    def forward_images(self, images: Iterable[Image.Image]) -> EmbedOutput:
        """Embed RGB images (in batches of ``batch_size``, preprocessed as each batch is made:
        an iterator of images is never held whole); logits come from the same pass."""
        if isinstance(images, Image.Image):
            raise InvalidRequestError("images must be a list, got a single image; for one image, write [image]")
        return self.forward_preprocessed(self.preprocess(im) for im in images)  # batch by batch

    def forward_preprocessed(self, tensors: Iterable[torch.Tensor], batch_size: int | None = None) -> EmbedOutput:
        """Embed ``preprocess``ed images [3, H, W] (in batches of ``batch_size``, default the embedder's)."""
        outs = [self.forward_batch(torch.stack(chunk)) for chunk in batched(tensors, batch_size or self.batch_size)]
        if not outs:
            n_cls = None if self.imagenet_classes is None else len(self.imagenet_classes)
            return EmbedOutput(np.zeros((0, self.spec.dim), np.float32),
                               None if n_cls is None else np.zeros((0, n_cls), np.float32))
        logits = None if outs[0].logits is None else np.concatenate([o.logits for o in outs])
        return EmbedOutput(np.concatenate([o.embeddings for o in outs]), logits)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embeddings only: [N, dim] float32, L2-normalised."""
        return self.forward_images(images).embeddings

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])


def degenerate(vectors: np.ndarray) -> np.ndarray:
    """Mask of the rows of ``vectors`` that are all zero or not finite: a forward pass that
    underflowed or overflowed (fp16 on some random-init networks). Good rows are unit vectors."""
    return ~(np.einsum("ij,ij->i", vectors, vectors) > 0.5)


def degenerate_why(precision: str) -> str:
    """Why an image whose embedding is ``degenerate`` is left out, for people."""
    return "its embedding is all zero or not finite" + (
        f" (at {precision}; --precision fp32 may embed it)" if precision != "fp32" else "")


def create_embedder(
    backbone: str = DEFAULT_BACKBONE,
    *,
    weights: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    pooling: str = "avg",
    layer: str | None = None,
    batch_size: int = 32,
    compile: bool = False,
) -> Embedder:
    """Build an ``Embedder``.

    Args:
        backbone: a registry name (``pictor models`` lists them).
        weights: None = the default pretrained weights; a weights tag, a checkpoint path,
            ``"offline"`` or ``"random"`` (see ``pictor.core.backbones``).
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        precision: ``"auto"`` (bf16/fp16 on GPU, bf16 on CPUs with AMX or AVX512-BF16, else
            fp32), or ``"fp32"``, ``"bf16"``, ``"fp16"``.
        pooling: global pooling of the feature map: ``"avg"``, ``"max"`` or ``"gem"``.
        layer: feature layer other than the last (see ``create_backbone``).
        batch_size: images per forward pass in ``forward_images``.
        compile: wrap the backbone in ``torch.compile`` (slow first call, faster after).
    """
    for name, value in (("weights", "" if weights is None else weights), ("device", device),
                        ("precision", precision), ("pooling", pooling)):
        if not isinstance(value, str):
            raise InvalidRequestError(f"{name} must be text, got {type(value).__name__}")
    if pooling not in POOLINGS:
        raise InvalidRequestError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    if batch_size < 1:
        raise InvalidRequestError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    bb = create_backbone(backbone, weights, layer=layer)
    log.info("embedder %s on %s, %s", bb.info.name, dev, prec)
    return Embedder(bb, device=dev, precision=prec, pooling=pooling, batch_size=batch_size,
                    compile=compile)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else must be a usable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InvalidRequestError(f"unknown device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {device!r} asked for, but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device {device!r} is not supported (use cpu or cuda)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """Pick the compute precision; ``"auto"`` uses reduced precision only where it is fast."""
    if precision not in PRECISIONS:
        raise InvalidRequestError(
            f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if runs_natively("bf16", device) else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if not runs_natively(precision, device):
        if device.type == "cuda":  # only bf16 can be emulated there
            log.warning("bf16 on this GPU is emulated (natively from compute capability 8.0) and slower than fp16")
        else:
            log.warning("%s on this CPU is emulated%s: 1.3x to 17x slower than fp32 in bench/embed.py", precision,
                        "" if precision == "fp16" else " (it has neither AMX nor AVX512-BF16)")
    return precision


def runs_natively(precision: str, device: torch.device) -> bool:
    """Whether ``device`` computes in ``precision`` in hardware (emulation is slower than fp32)."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        # torch.cuda.is_bf16_supported() also says yes where bf16 is emulated (before Ampere),
        # and asks about the current device, not this one.
        return precision == "fp16" or bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    return precision == "bf16" and cpu_has_fast_bf16()


def kept_precision(requested: str, made_at: str | None, device: str) -> str:
    """``requested``; for "auto", the precision vectors or a head were ``made_at`` where this
    device computes it natively: the same image then gives the same embedding again."""
    if requested == "auto" and made_at not in (None, "auto") and runs_natively(made_at, resolve_device(device)):
        return made_at
    return requested


def warn_mixed_precision(index: str | os.PathLike[str], made_at: str | None, precision: str, doing: str) -> None:
    """Say that ``doing`` embeds at another precision than the index's vectors were made at."""
    if made_at is not None and made_at != precision:
        log.warning("index %s holds vectors embedded at %s; %s at %s, which differ a little (cosine "
                    "0.98 to 1.0 for the same image, so an indexed image may score below 1 against "
                    "itself): --precision %s embeds as the index did", index, made_at, doing, precision, made_at)


@cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16); Linux flags only."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def preprocess_image(image: Image.Image, p: Preprocessing) -> torch.Tensor:
    """Resize the shorter side to ``p.resize_size``, centre-crop ``p.input_size``, normalise.

    Same steps and Pillow resampling as torchvision's / timm's eval transforms.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    if image.mode != "RGB":
        image = image.convert("RGB")
    image = _trim_long_side(image)
    image = TF.resize(image, p.resize_size, interpolation=InterpolationMode(p.interpolation))
    image = TF.center_crop(image, [p.input_size, p.input_size])
    return TF.normalize(TF.to_tensor(image), list(p.mean), list(p.std))


def _trim_long_side(image: Image.Image) -> Image.Image:
    """Keep the centre of an extreme strip: at most ``MAX_ASPECT`` times its short side.

    Resizing the short side of a 20000x1 PNG (140 bytes) to 256 px would make a 4 GB image,
    of which the centre crop keeps a square. That square lies inside the centred part kept
    here, so the result is unchanged (to rounding) and the memory stays bounded.
    """
    w, h = image.size
    if max(w, h) <= MAX_ASPECT * min(w, h):
        return image
    keep = MAX_ASPECT * min(w, h)
    if w > h:
        left = (w - keep) // 2
        return image.crop((left, 0, left + keep, h))
    top = (h - keep) // 2
    return image.crop((0, top, w, top + keep))


def pool_features(fmap: torch.Tensor, pooling: str) -> torch.Tensor:
    """Global pooling of a feature map [N, C, H, W] -> [N, C]: "avg", "max" or "gem"."""
    if pooling == "avg":
        return fmap.mean(dim=(2, 3))
    if pooling == "max":
        return fmap.amax(dim=(2, 3))
    # GeM: a soft max between avg (p=1) and max (p->inf); clamp because features can be < 0.
    return fmap.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)


def apply_backbone_state(
    embedder: Embedder, state: Mapping[str, torch.Tensor], fingerprint: str = ""
) -> None:
    """Load fine-tuned backbone tensors into ``embedder`` and mark its spec as fine-tuned.

    ``state`` names tensors of ``embedder.backbone`` (only the changed ones need to be there);
    ``fingerprint`` defaults to ``fingerprint_state(state)``. No tensors change nothing: the
    spec stays the plain backbone's (`pictor train --mode finetune --unfreeze 0`).
    """
    if not state:
        return
    module = embedder.backbone
    own = module.state_dict()
    # Checked before loading: load_state_dict copies tensor by tensor and would leave a
    # refused state half loaded.
    foreign = [k for k in state if k not in own]
    if foreign:
        raise IncompatibleModelError(
            f"fine-tuned weights do not fit backbone {embedder.spec.backbone}: unknown tensors "
            f"{foreign[:3]}{'...' if len(foreign) > 3 else ''}"
        )
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise IncompatibleModelError(
                f"fine-tuned tensor {name} has shape {tuple(tensor.shape)}, the backbone "
                f"{embedder.spec.backbone} {tuple(own[name].shape)}"
            )
    module.load_state_dict(dict(state), strict=False)  # a partial state: only what changed
    embedder.spec = dataclasses.replace(
        embedder.spec, finetune=fingerprint or fingerprint_state(state)
    )


def fingerprint_state(state: Mapping[str, torch.Tensor]) -> str:
    """Stable hex digest of tensors by name: identifies fine-tuned backbone weights."""
    h = hashlib.sha256()
    for name in sorted(state):
        # flatten: a channels_last tensor with size-1 dims can claim to be contiguous
        t = state[name].detach().cpu().flatten()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def embedder_for_spec(
    spec: ModelSpec,
    *,
    weights: str = "",
    device: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    backbone_state: Mapping[str, torch.Tensor] | None = None,
    no_checkpoint: Callable[[str], Exception],
    mismatch: Callable[[ModelSpec], Exception],
) -> Embedder:
    """The embedder that makes ``spec``'s embeddings again: its backbone, pooling and layer, and
    the fine-tuned tensors ``spec.finetune`` names (``backbone_state``, from a model file).

    ``weights`` replaces ``spec.weights`` when given. A spec keeps only a local checkpoint's hash
    (``file:<sha256>``), so ``weights`` must then be the checkpoint's path: else the error
    ``no_checkpoint(weights)`` is raised, before any backbone loads. The embedder built must have
    ``spec`` (a checkpoint can change under its path, another tag can be given): else the error
    ``mismatch(the spec it has)``. The callers word both errors, since what was asked differs
    (an index's embedder, a model file's).
    """
    if spec.weights.startswith("file:") and not (weights and Path(weights).expanduser().is_file()):
        raise no_checkpoint(weights)
    try:
        embedder = create_embedder(spec.backbone, weights=weights or spec.weights, device=device,
                                   precision=precision, pooling=spec.pooling, layer=spec.layer or None)
    except WeightsUnavailableError as e:
        if weights:
            raise
        # Other weights, which the error would suggest, make other vectors: no use here.
        raise WeightsUnavailableError(f"{e.needed} (the index or model was made with these weights: no "
                                      "others will do)") from None
    apply_backbone_state(embedder, backbone_state or {}, spec.finetune)
    if embedder.spec != spec:
        raise mismatch(embedder.spec)
    if compile:
        embedder.compile_backbone()  # after the fine-tuned tensors are in
    return embedder


def embedder_for_index(spec: ModelSpec, index: str | os.PathLike[str], *, weights: str = "",
                       device: str = "auto", precision: str = "auto", compile: bool = False) -> Embedder:
    """The embedder that made an index's vectors, from its (unwhitened) ``spec``. An index
    keeps only a checkpoint's hash, so ``weights`` must then give its path; one a fine-tuned
    backbone made needs the model file (``TrainedModel.create_embedder``)."""
    if spec.finetune:
        raise IncompatibleModelError(
            f"index {index} was embedded by a fine-tuned backbone (finetune={spec.finetune[:12]}); "
            "give the model file that tuned it: --model MODEL"
        )
    return embedder_for_spec(
        spec, weights=weights, device=device, precision=precision, compile=compile,
        no_checkpoint=lambda given: InvalidRequestError(
            f"index {index} was embedded with the weights of a local checkpoint ({spec.weights[:17]}...)"
            + (f", not {given!r}" if given else "")
            + "; give its path with --weights PATH (or PICTOR_WEIGHTS, or weights = in the config file)"),
        mismatch=lambda built: IncompatibleModelError(
            f"the model of --weights: {built.describe()}; but this index holds vectors from "
            f"{spec.describe()}; re-embed with the index's model or rebuild the index"),
    )
