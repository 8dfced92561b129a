"""Fine-tuning the last stages of the embedder's own backbone together with the head.

The backbone module inside the ``Embedder`` is trained in place, so the validation pass each
epoch runs exactly the served pipeline (``Embedder.embed``: centre crop, pool, L2 norm) and the
loss sees the same unit embeddings the head will see at serving time. Recipe: head initialised
by the linear probe (LP-FT), last N stages unfrozen with a lower learning rate, batch-norm
statistics frozen (small batches), random resized crop + flip + colour jitter, mixup / CutMix
(timm), label smoothing, class weights, linear warm-up then cosine decay, early stopping on
validation accuracy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pictor.core.head import ClassifierHead
from pictor.errors import InvalidImageError, InvalidRequestError, NotFoundError
from pictor.trainer.config import TrainConfig
from pictor.trainer.data import Sample

if TYPE_CHECKING:
    from PIL import Image

    from pictor.core.backbones import Backbone
    from pictor.core.embedder import Embedder

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    changed_state: dict[str, torch.Tensor]  # backbone tensors that differ from the pretrained
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the trained ones, as they began


# --------------------------------------------------------------------------- stages


def unfreeze_last(backbone: Backbone, n_stages: int) -> list[str]:
    """Make the last ``n_stages`` stages (``Backbone.stages``) and everything after them
    trainable; return names.

    The ImageNet classifier stays frozen: the loss never reaches it.
    """
    backbone.requires_grad_(False)
    if n_stages == 0:
        return []
    stages = backbone.stages()
    if not stages:
        raise InvalidRequestError(
            f"cannot find the stages of backbone {backbone.info.name} to fine-tune; use --mode linear")
    if n_stages > len(stages):
        log.warning("--unfreeze %d: the backbone has %d stages; training all of them", n_stages, len(stages))
    first = stages[max(0, len(stages) - n_stages)]
    classifier = backbone.classifier_parameter_names()
    trainable = []
    started = False
    for name, param in backbone.named_parameters():
        started = started or name.startswith(first + ".")
        if started and name not in classifier:
            param.requires_grad_(True)
            trainable.append(name)
    return trainable


def _drops_last_batch(n: int, batch_size: int) -> bool:
    """Whether an epoch leaves out its short last batch (other images each epoch, as it
    shuffles): only when under half a batch, whose noisier step is not worth it. Dropping any
    short batch cost 28 of 60 images an epoch (a walkthrough's small set: one step of 32)."""
    return n > batch_size and n % batch_size < batch_size / 2


def _freeze_batchnorm(module: nn.Module) -> None:
    # Small fine-tuning batches give noisy statistics; the pretrained ones serve better.
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# --------------------------------------------------------------------------- data


class AugmentedImages(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Training images decoded on the fly and augmented (random resized crop, flip, jitter)."""

    def __init__(self, samples: Sequence[Sample], labels: Sequence[int], embedder: Embedder,
                 size: int, max_pixels: int) -> None:
        from torchvision.transforms import InterpolationMode, v2

        p = embedder.spec.preprocessing
        self.samples, self.labels = list(samples), list(labels)
        self.draft, self.max_pixels = embedder.draft_size, max_pixels
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.25, 1.0),
                                 interpolation=InterpolationMode(p.interpolation), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(p.mean), std=list(p.std)),
        ])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from pictor.core.decode import load_image

        img = load_image(self.samples[i].path, max_pixels=self.max_pixels, draft_size=self.draft)
        return self.transform(img), self.labels[i]


def _decoded(samples: Sequence[Sample], draft: tuple[int, int], max_pixels: int) -> Iterator[Image.Image]:
    """The images, decoded one at a time as they are needed (a validation set decoded and
    held for the whole run would take gigabytes of PNGs, which decode in full)."""
    from pictor.core.decode import load_image

    for s in samples:
        try:
            yield load_image(s.path, max_pixels=max_pixels, draft_size=draft)
        except (InvalidImageError, NotFoundError) as e:  # checked by the embedding pass already
            raise InvalidImageError(f"an image became unreadable during training: {e}") from e  # e names it


# --------------------------------------------------------------------------- loop


def default_train_size(input_size: int) -> int:
    """7/8 of the test input size, rounded to a multiple of 32 (192 for 224)."""
    return max(32, round(input_size * 7 / 8 / 32) * 32)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return factor


def finetune(
    embedder: Embedder,
    head: ClassifierHead,
    train: tuple[Sequence[Sample], np.ndarray],
    val: tuple[Sequence[Sample], np.ndarray],
    config: TrainConfig,
    *,
    class_weights: torch.Tensor | None = None,
) -> FinetuneResult:
    """Train the last ``config.unfreeze`` stages of ``embedder.backbone`` and ``head`` in place.

    On return both hold the weights of the best validation epoch (the embedder's spec is not
    changed here; the caller marks it fine-tuned from ``changed_state``).
    """
    from timm.utils import random_seed
    from tqdm import tqdm

    random_seed(config.seed)  # torch, and numpy's global generator, which timm's Mixup draws from
    backbone, device = embedder.backbone, embedder.device
    trainable = unfreeze_last(backbone, config.unfreeze)
    initial = {n: t.detach().clone() for n, t in backbone.state_dict().items()
               if n in set(trainable)}
    head.to(device)
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": list(head.parameters()), "lr": config.lr},
        {"params": params, "lr": config.backbone_lr},
    ], weight_decay=config.weight_decay)
    size = config.train_size or default_train_size(embedder.spec.preprocessing.input_size)
    data = AugmentedImages(train[0], train[1].tolist(), embedder, size, config.max_pixels)
    loader = torch.utils.data.DataLoader(
        data, batch_size=config.batch_size, shuffle=True, drop_last=_drops_last_batch(len(data), config.batch_size),
        generator=torch.Generator().manual_seed(config.seed),
    )
    total = config.epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(total, round(config.warmup_epochs * len(loader))))
    weights = None if class_weights is None else class_weights.to(device)
    mix = None
    if config.mixup > 0 or config.cutmix > 0:
        from timm.data import Mixup

        # Smoothing is left to the loss below, which applies it to the mixed targets too.
        mix = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=0.0,
                    num_classes=head.num_classes)

    # fp16 gradients underflow without loss scaling (bf16 and fp32 need none).
    scaler = torch.amp.GradScaler(device.type, enabled=embedder.precision == "fp16")

    best = (-1.0, -math.inf)  # (val accuracy, -val loss)
    best_state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
    result = FinetuneResult({}, 0, 0, initial_state=initial)
    stale = 0
    for epoch in range(1, config.epochs + 1):
        backbone.train()
        _freeze_batchnorm(backbone)
        head.train()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(loader, desc=f"finetune {epoch}/{config.epochs}", unit="batch",
                   disable=not config.progress, leave=False)
        for x, y in bar:
            # timm's Mixup pairs each image with the batch reversed: an even batch is needed.
            target: torch.Tensor = y
            if mix is not None and len(x) % 2 == 0:
                x, target = mix(x, y)
            target = target.to(device)
            logits = head(embedder.embed_tensor(x)[0])  # the embedder's precision, as served
            loss = F.cross_entropy(logits, target, weight=weights,
                                   label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            seen += len(y)
            # Mixed batches: the label with the larger share counts as the right answer.
            hard = target.argmax(1) if target.ndim == 2 else target
            correct += int((logits.argmax(1) == hard).sum())
            loss_sum += float(loss.detach()) * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        backbone.eval()
        head.eval()
        val_acc, val_loss = _validate(embedder, head, _decoded(val[0], embedder.draft_size, config.max_pixels), val[1])
        row = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1),
               "train_accuracy": correct / max(seen, 1), "val_accuracy": val_acc,
               "val_loss": val_loss}
        result.history.append(row)
        log.info("epoch %d: train loss %.4f acc %.4f, val loss %.4f acc %.4f", epoch,
                 row["train_loss"], row["train_accuracy"], val_loss, val_acc)
        result.epochs_run = epoch
        if (val_acc, -val_loss) > best:
            best, stale, result.best_epoch = (val_acc, -val_loss), 0, epoch
            best_state = (
                {n: t.detach().clone() for n, t in backbone.state_dict().items() if n in initial},
                {n: t.detach().clone() for n, t in head.state_dict().items()},
            )
        else:
            stale += 1
            if stale >= config.patience:
                log.info("early stop: no validation gain for %d epochs", stale)
                break
    assert best_state is not None
    backbone.load_state_dict(best_state[0], strict=False)
    head.load_state_dict(best_state[1])
    backbone.requires_grad_(False).eval()
    head.cpu().eval()
    result.changed_state = {n: t.cpu() for n, t in best_state[0].items()
                            if not torch.equal(t, initial[n])}
    return result


def _validate(embedder: Embedder, head: ClassifierHead, images: Iterable[Image.Image],
              y: np.ndarray) -> tuple[float, float]:
    """Accuracy and loss through the served path (the embedder's forward pass, then the head)."""
    emb = embedder.forward_images(images).embeddings
    with torch.no_grad():
        logits = head(torch.as_tensor(emb, device=embedder.device)).float().cpu()
    yt = torch.as_tensor(y, dtype=torch.long)
    return float((logits.argmax(1) == yt).float().mean()), float(F.cross_entropy(logits, yt))
