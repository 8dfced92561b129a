"""Local checkpoint files of a backbone: read safely and fitted into its network.

A checkpoint's format is told from its content (safetensors, or a torch file read with
``weights_only``, allowing the plain data training scripts save beside the weights); the
weights are unwrapped from ``{"state_dict": ...}`` and prefixes such as ``module.``, renamed
where a published file uses other names, and must fit every feature tensor. The ImageNet
classifier may be missing or of another shape: embeddings do not need it.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pictor.core.files import why_not_tensors
from pictor.errors import InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from pictor.core.backbones import BackboneInfo

log = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".tar")  # timm: model_best.pth.tar


def looks_like_path(w: str) -> bool:
    return (os.sep in w or "/" in w or w.startswith("~") or w.endswith(_CHECKPOINT_SUFFIXES)
            or Path(w).exists())


def _is_safetensors(path: Path) -> bool:
    """Whether the file is in the safetensors format, whatever its name: it starts with its
    JSON header's length (8 bytes, little-endian), then the header's ``{``."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if _is_safetensors(path):
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        try:
            obj = _torch_load_data(path)
        except (EOFError, OSError):
            raise
        except Exception as e:  # weights_only refuses pickled code; garbage fails in many ways
            why = why_not_tensors(path, e)
            hint = "; save model.state_dict() instead" if "pickled" in why or "TorchScript" in why else ""
            raise InvalidRequestError(f"cannot read checkpoint {path}: {why}{hint}") from e
    if not isinstance(obj, dict):
        raise InvalidRequestError(f"checkpoint {path} does not hold a state dict")
    from pictor.core.head import MODEL_FORMAT  # (head imports the backbones: not at module level)

    if obj.get("format") == MODEL_FORMAT:  # it read as a checkpoint whose keys did not fit
        raise InvalidRequestError(f"{path} is a model file of `pictor train`, not backbone weights; "
                                  "index and serve take it with --model")
    sd = _unwrapped(obj)
    if not sd:
        raise InvalidRequestError(f"checkpoint {path} holds no tensors, nor a dict of them under any of its "
                                  f"keys ({', '.join(map(repr, list(obj)[:10]))}); save model.state_dict()")
    return sd


def _tensors(obj: dict[Any, Any]) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _unwrapped(obj: dict[Any, Any]) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint as training scripts wrap them ({"state_dict": ...},
    {"model": ...}, PyTorch's tutorial's {"model_state_dict": ..., "optimizer_state_dict": ...}):
    the EMA weights where timm keeps them, else the nested dict with the most tensors, unless
    the top level holds more."""
    if isinstance(ema := obj.get("state_dict_ema"), dict) and _tensors(ema):
        return _tensors(ema)
    nested = [_tensors(v) for v in obj.values() if isinstance(v, dict)]
    return max([_tensors(obj), *nested], key=len)


# Plain data that training scripts save beside the weights (timm's train.py its argparse
# arguments, others metrics as numpy scalars or arrays): safe to unpickle, unlike code.
_DATA_GLOBALS = re.compile(
    r"argparse\.Namespace|numpy\.(?:_core|core)\.multiarray\.(?:scalar|_reconstruct)|numpy\.dtype"
    r"|numpy\.ndarray|numpy\.dtypes\.\w+DType")


def _torch_load_data(path: Path) -> Any:
    """``torch.load`` with ``weights_only``, also allowing the plain-data classes above (when a
    file needs others, torch's refusal stands)."""
    # An open file, not the path: torch.load reads any name ending .safetensors as safetensors,
    # and the format was already told from the content.
    try:
        with path.open("rb") as f, warnings.catch_warnings():
            # Of a TorchScript archive, which weights_only then refuses: why_not_tensors says so.
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # an old or damaged file: the first error tells more
            names = []
        if not names or not all(_DATA_GLOBALS.fullmatch(n) for n in names):
            raise
        allowed = [getattr(importlib.import_module(module), name)
                   for module, _, name in (n.rpartition(".") for n in names)]
        if any(n.startswith("numpy.") for n in names):  # numpy's dtype classes show only while loading
            import numpy

            allowed += [c for c in vars(numpy.dtypes).values() if isinstance(c, type) and c.__name__.endswith("DType")]
        with torch.serialization.safe_globals(allowed), path.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)


def _strip_wrapper_prefix(sd: dict[str, torch.Tensor], own: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors without the prefix that wrappers put on every name (DataParallel
    ``module.``, Lightning ``model.``, ``torch.compile`` ``_orig_mod.``, a ``backbone.``
    attribute, or several): the prefix, up to 3 levels deep, under which most names match
    the network's. Tensors outside it (a wrapper's loss weights) are left out."""
    own = set(own)
    prefixes = {".".join(parts[:i]) + "." for parts in (k.split(".") for k in sd)
                for i in range(1, min(4, len(parts)))}
    best, matched = "", sum(k in own for k in sd)
    for prefix in sorted(prefixes):
        n = sum(k[len(prefix):] in own for k in sd if k.startswith(prefix))
        if n > matched:
            best, matched = prefix, n
    return {k[len(best):]: v for k, v in sd.items() if k.startswith(best)} if best else sd


_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def load_checkpoint_into(model: nn.Module, path: Path, info: BackboneInfo) -> tuple[str, bool]:
    """Load a local checkpoint; returns its reference ``file:<sha256>`` and whether it brought
    the ImageNet classifier.

    Every feature tensor must fit. The classifier (see ``classifier_prefixes``) may be missing or
    of another shape (a head fine-tuned for other classes): embeddings do not need it, so it
    is left out, and the backbone has no ImageNet labels then.
    """
    path = path.expanduser()
    if path.is_dir():
        raise InvalidRequestError(f"checkpoint {path} is a folder; give the weights file in it")
    if path.exists() and not path.is_file():  # a pipe or a device: reading it may never end
        raise InvalidRequestError(f"checkpoint {path} is not a regular file; give the weights file")
    if not path.is_file():
        raise NotFoundError(f"checkpoint file {path} does not exist")
    try:
        sd = _read_checkpoint(path)
    except InvalidRequestError:
        raise
    except EOFError as e:
        raise InvalidRequestError(f"cannot read checkpoint {path}: the file is empty or cut short") from e
    except Exception as e:  # torch's and safetensors' readers fail in many ways on a bad file
        raise InvalidRequestError(f"cannot read checkpoint {path}: {first_line(e)}") from e
    own = model.state_dict()
    sd = _strip_wrapper_prefix(sd, own)
    if info.arch.startswith("tf_efficientnet_lite") and "_conv_stem.weight" in sd:
        sd = _map_lukemelas_to_timm(sd, model, path)
    if info.arch in ("googlenet", "inception_v3"):
        sd = {k: v for k, v in sd.items() if not k.startswith(("aux1.", "aux2.", "AuxLogits."))}
    if info.arch.startswith("densenet"):
        # torchvision's published DenseNet files name "norm.1" what the model calls "norm1";
        # torchvision renames them when it loads its download (densenet._load_state_dict).
        sd = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in sd.items()}
    prefixes, kept = classifier_prefixes(model, info)
    classifier = {k for k in own if k.startswith(prefixes) and not k.startswith(kept)}
    # A head for other classes, of another shape or structure (Dropout + Linear, an MLP).
    sd = {k: v for k, v in sd.items()
          if not (k.startswith(prefixes) and not k.startswith(kept) and (k not in own or v.shape != own[k].shape))}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # tensors of the wrong shape
        raise InvalidRequestError(
            f"checkpoint {path} does not fit backbone {info.name}: {first_line(e, skip=1)}") from e
    features_missing = [k for k in missing if not k.endswith("num_batches_tracked") and k not in classifier]
    if features_missing or unexpected:
        raise InvalidRequestError(
            f"checkpoint {path} does not fit backbone {info.name}: "
            f"missing {features_missing[:5]}{'...' if len(features_missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    has_classifier = not classifier & set(missing)
    if not has_classifier:
        log.info("checkpoint %s has no ImageNet classifier for %s: embeddings only", path, info.name)
    return f"file:{_sha256(path)}", has_classifier


def classifier_prefixes(model: nn.Module, info: BackboneInfo) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(prefixes, exceptions): tensor names of the ImageNet classifier, which embeddings do not
    use, start with one of the prefixes and none of the exceptions. torchvision: the whole
    classifier module (VGG's and MobileNetV3's have hidden layers) but a norm the embedding is
    taken after (ConvNeXt's); timm: the modules the model's ``pretrained_cfg`` names (two for
    distilled models)."""
    if info.source == "torchvision" and info.logits_node:
        head = info.logits_node.split(".")[0] + "."
        return (head,), ((f"{info.head_norm}.",) if info.head_norm else ())
    heads = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return tuple(f"{h}." for h in ([heads] if isinstance(heads, str) else heads)), ()


def first_line(e: BaseException, skip: int = 0) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[skip:] or lines or [type(e).__name__])[0]


def _map_lukemelas_to_timm(sd: dict[str, torch.Tensor], model: nn.Module, path: Path
                           ) -> dict[str, torch.Tensor]:
    """Rename lukemelas/EfficientNet-PyTorch keys to timm's: same tensors, same order."""
    src = [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise InvalidRequestError(
            f"checkpoint {path} has {len(src)} tensors, the timm network {len(dst)}"
        )
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
        if sv.shape != dv.shape:
            raise InvalidRequestError(
                f"checkpoint {path}: tensor {sk} {tuple(sv.shape)} does not match "
                f"{dk} {tuple(dv.shape)}"
            )
        out[dk] = sv
    return out


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
