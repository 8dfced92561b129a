"""Identity of an embedding space: which backbone, weights, layer and preprocessing made a vector.

An index stores the ``ModelSpec`` that filled it and refuses queries, vectors and heads made
under another one (``ModelSpec.check_compatible``). Pure data: no torch here.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from pictor.errors import IncompatibleModelError, InvalidRequestError, shown


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor; taken from the weights' own config."""

    input_size: int = 224  # square crop fed to the network
    resize_size: int = 256  # shorter side before the centre crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"  # "bilinear" or "bicubic"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d["interpolation"]),
        )


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides where an image lands in embedding space."""

    backbone: str  # registry name, e.g. "efficientnet_lite0"
    weights: str  # weights reference: "offline", a torchvision/timm tag, "file:<sha256>", "random"
    dim: int
    pooling: str = "avg"  # "avg", "max" or "gem"
    layer: str = ""  # "" = the backbone's default (penultimate) features
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    # Fingerprint of fine-tuned backbone weights, "" for the weights as published.
    finetune: str = ""
    # PCA-whitening applied after the embedder ("pca<dim>:<fingerprint>", "" none); ``dim``
    # is then the whitened dim. Set by an index built with ``--pca-whiten``.
    whitening: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, numbers.Integral) or self.dim < 1:
            # (FAISS's own words otherwise, or a store of 0-d vectors)
            raise InvalidRequestError(f"an embedding's dim must be a whole number of at least 1, got {shown(self.dim, 40)}")
        object.__setattr__(self, "dim", int(self.dim))  # a numpy int (an array's shape) as Python's

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # nested: preprocessing becomes a dict too
        if not self.whitening:
            del d["whitening"]  # unwhitened specs keep their old form (cache keys, model files)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(
            backbone=str(d["backbone"]),
            weights=str(d["weights"]),
            dim=int(d["dim"]),
            pooling=str(d.get("pooling", "avg")),
            layer=str(d.get("layer", "")),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            finetune=str(d.get("finetune", "")),
            whitening=str(d.get("whitening", "")),
        )

    def describe(self) -> str:
        extra = f", layer={self.layer}" if self.layer else ""
        tuned = f", finetune={self.finetune[:12]}" if self.finetune else ""
        white = f", whitening={self.whitening}" if self.whitening else ""
        return (
            f"{self.backbone} (weights={self.weights}, dim={self.dim}, "
            f"pooling={self.pooling}{extra}{tuned}{white})"
        )

    def check_compatible(self, other: ModelSpec, what: str = "query") -> None:
        """Raise ``IncompatibleModelError`` unless ``other`` embeds into this same space."""
        if other != self:
            raise IncompatibleModelError(
                f"{what}: {other.describe()}; but this index holds vectors from "
                f"{self.describe()}; re-embed with the index's model or rebuild the index"
            )
