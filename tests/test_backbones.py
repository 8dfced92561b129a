"""The backbone registry: every family builds, dims match, weights fail fast and load from files."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pictor.core import _backbone_checkpoints as checkpoints
from pictor.core import _backbone_hub as hub
from pictor.core import backbones as bb
from pictor.core.backbones import (
    BackboneInfo,
    backbone_names,
    create_backbone,
    get_backbone_info,
    register_backbone,
)
from pictor.core.embedder import embedder_for_index
from pictor.core.spec import ModelSpec
from pictor.errors import InvalidRequestError, NotFoundError, WeightsUnavailableError

# One quick network per family runs by default (AlexNet's 58 M classifier weights are slow to
# initialise, so its family runs with the slow ones); the rest are heavy.
FAST = {"googlenet", "resnet18", "resnext50_32x4d", "seresnet50", "densenet121",
        "efficientnet_b0", "efficientnet_lite0", "mobilenet_v3_small", "mobilenet_v3_large",
        "regnet_y_400mf", "convnext_tiny"}
FAMILIES = {"AlexNet", "VGG", "GoogLeNet/Inception", "ResNet", "ResNeXt", "SENet", "DenseNet",
            "EfficientNet", "EfficientNet-Lite", "MobileNetV3", "RegNet", "ConvNeXt"}


def _small_input(name: str) -> torch.Tensor:
    size = 80 if name == "inception_v3" else 64  # Inception-v3's stem needs >= 75 px
    return torch.randn(2, 3, size, size)


@pytest.mark.parametrize(
    "name",
    [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in backbone_names()],
)
def test_every_backbone_builds_with_its_registered_dim(name: str) -> None:
    net = create_backbone(name, weights="random")
    info = get_backbone_info(name)
    assert net.dim == info.dim and net.weights == "random" and net.classes is None
    with torch.inference_mode():
        fmap, logits = net(_small_input(name))
    assert fmap.ndim == 4 and fmap.shape[:2] == (2, info.dim)
    assert logits is None  # random weights: no ImageNet logits
    assert net.pooled_head(fmap.mean((2, 3))).shape == (2, info.dim)
    assert net.stages(), "fine-tuning needs the stages of every family"
    p = net.preprocessing  # preprocessing of the default weights travels even with random init
    assert p.resize_size >= p.input_size >= 224 and p.interpolation in ("bilinear", "bicubic")


def test_registry_covers_every_family_once_per_name() -> None:
    names = backbone_names()
    assert len(names) == len(set(names))
    assert {get_backbone_info(n).family for n in names} == FAMILIES


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(NotFoundError, match="valid names: .*resnet50.*efficientnet_lite0"):
        create_backbone("resnet51")
    for typed, meant in (("ResNet18", "'resnet18'?"), ("efficientnet-b0", "'efficientnet_b0'?"),
                         ("resnet19", "'resnet18' or ")):
        with pytest.raises(NotFoundError, match=f"unknown backbone '{typed}': did you mean {meant}"):
            get_backbone_info(typed)


def test_duplicate_registration_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(BackboneInfo("resnet18", "ResNet", "torchvision", "resnet18", 512))


def test_unknown_weights_tag_lists_valid_tags() -> None:
    with pytest.raises(InvalidRequestError, match="IMAGENET1K_V1.*random"):
        create_backbone("resnet18", weights="IMAGENET9K")
    with pytest.raises(InvalidRequestError, match="offline.*in1k"):
        create_backbone("efficientnet_lite0", weights="bogus_tag")


def test_missing_weights_fail_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch hub cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("PICTOR_OFFLINE", "1")
    start = time.monotonic()
    # Offline says so, not "cannot be reached": nothing was tried.
    with pytest.raises(WeightsUnavailableError, match=r"IMAGENET1K_V1.*not cached .* downloads are off \(PICTOR_OFFLINE\).*random"):
        create_backbone("resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(WeightsUnavailableError, match=r"a1_in1k.*downloads are off \(PICTOR_OFFLINE\).*checkpoint"):
        create_backbone("seresnet50")
    # The weights an index was made with: other weights, which the error suggests otherwise, would not do.
    spec = ModelSpec(backbone="resnet18", weights="IMAGENET1K_V1", dim=512)
    with pytest.raises(WeightsUnavailableError, match=r"not cached .*copying the file there \(the index or model "
                       r"was made with these weights: no others will do\)$"):
        embedder_for_index(spec, "index")
    assert time.monotonic() - start < 5.0
    assert create_backbone("efficientnet_lite0", weights="DEFAULT").weights == "offline"  # any case, as torchvision's
    assert not bb.weights_available_offline("resnet18")
    assert bb.weights_available_offline("efficientnet_lite0")
    assert bb.weights_available_offline("resnet18", "random")


def test_timm_weights_download_tries_the_files_timm_tries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No network at test time: the hub's answers are given. A repository without
    # model.safetensors is read from its pytorch_model.bin, as timm reads it.
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("PICTOR_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_reachable", lambda url: True)
    in_repo = {"pytorch_model.bin"}
    asked: list[str] = []

    def download(repo: str, filename: str, **_: Any) -> str:
        asked.append(filename)
        if filename not in in_repo:
            raise EntryNotFoundError(f"404: {filename}")
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    info = bb.get_backbone_info("seresnet50")
    cfg = bb._timm_pretrained_cfg(info, bb.default_weights("seresnet50"))
    assert hub.timm_ensure_file(info, cfg) == tmp_path / "pytorch_model.bin"
    assert asked == ["model.safetensors", "pytorch_model.bin"]
    in_repo.clear()
    with pytest.raises(WeightsUnavailableError, match=r"model.safetensors or pytorch_model.bin.*none of them"):
        hub.timm_ensure_file(info, cfg)


def test_unreachable_host_is_detected_quickly() -> None:
    start = time.monotonic()
    assert not hub._reachable("http://127.0.0.1:9/weights.pth")  # discard port: refused
    assert time.monotonic() - start < 4.0


def test_local_checkpoint_loads(tmp_path: Path) -> None:
    import torchvision

    trained = torchvision.models.resnet18()  # stands in for a fine-tuned network
    path = tmp_path / "resnet18-finetuned.pth"
    torch.save({"state_dict": trained.state_dict()}, path)  # as training scripts wrap it
    src = create_backbone("resnet18", weights="random")
    src.load_state_dict({f"extractor.{k}": v for k, v in trained.state_dict().items()
                         if not k.startswith("fc.")})
    net = create_backbone("resnet18", weights=str(path))
    assert net.weights.startswith("file:") and len(net.weights) == len("file:") + 64
    assert net.classes is not None and len(net.classes) == 1000
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        (f1, _), (f2, logits) = src(x), net(x)
    assert torch.allclose(f1, f2) and logits is not None and logits.shape == (1, 1000)
    # The format is read from the file, not its name: safetensors saved as .pth (some hubs
    # rename them), and a torch file named .safetensors.
    from safetensors.torch import save_file

    swapped = tmp_path / "resnet18-safetensors.pth"
    save_file(trained.state_dict(), str(swapped))
    torch.save(trained.state_dict(), tmp_path / "resnet18-torch.safetensors")
    for name in ("resnet18-safetensors.pth", "resnet18-torch.safetensors"):
        with torch.inference_mode():
            f3, _ = create_backbone("resnet18", weights=str(tmp_path / name))(x)
        assert torch.allclose(f1, f3)
    # PyTorch's tutorial's wrapping (beside the optimiser's state), and other names for it.
    other = torchvision.models.resnet18()  # (its optimiser state: a momentum buffer per parameter)
    optimiser = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    other(torch.randn(2, 3, 32, 32)).sum().backward()
    optimiser.step()
    tutorial = {"epoch": 3, "model_state_dict": trained.state_dict(),
                "optimizer_state_dict": optimiser.state_dict(), "loss": 0.1}
    for i, wrapped in enumerate([tutorial, {"net": trained.state_dict(), "step": 7}]):
        torch.save(wrapped, tmp_path / f"wrapped{i}.pth")
        with torch.inference_mode():
            f4, _ = create_backbone("resnet18", weights=str(tmp_path / f"wrapped{i}.pth"))(x)
        assert torch.allclose(f1, f4)
    torch.save({"epoch": 3, "loss": 0.1}, path)
    with pytest.raises(InvalidRequestError, match=r"holds no tensors, nor a dict of them .*\('epoch', 'loss'\)"):
        create_backbone("resnet18", weights=str(path))


class _RunsCode:
    """Unpickled, it would make the folder ``marker``: code in a weights file, which must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (str(self.marker),))


def test_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(InvalidRequestError, match="does not fit backbone resnet18"):
        create_backbone("resnet18", weights=str(path))
    with pytest.raises(NotFoundError, match="does not exist"):
        create_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(NotFoundError, match="model_best.pth.tar does not exist"):  # not "unknown weights"
        create_backbone("resnet18", weights="model_best.pth.tar")
    with pytest.raises(InvalidRequestError, match="is a folder; give the weights file in it"):
        create_backbone("resnet18", weights=str(tmp_path))
    os.mkfifo(tmp_path / "pipe.pth")
    with pytest.raises(InvalidRequestError, match="pipe.pth is not a regular file; give the weights file"):
        create_backbone("resnet18", weights=str(tmp_path / "pipe.pth"))
    # A model file of `pictor train` given as --weights: said as such, not as keys that do not fit.
    model_file = tmp_path / "flowers.pt"
    torch.save({"format": "pictor.model", "format_version": 1, "head": {"weight": torch.zeros(5, 1280)},
                "training_images": 750}, model_file)
    with pytest.raises(InvalidRequestError, match="flowers.pt is a model file of `pictor train`, not backbone "
                       "weights; index and serve take it with --model"):
        create_backbone("resnet18", weights=str(model_file))
    # The common mistakes are messages, not tracebacks.
    wide = torchvision.models.resnet18().state_dict()
    wide["layer1.0.conv1.weight"] = torch.zeros(128, 64, 3, 3)
    torch.save(wide, path)
    with pytest.raises(InvalidRequestError, match="does not fit backbone resnet18: size mismatch for layer1"):
        create_backbone("resnet18", weights=str(path))
    torch.save(torchvision.models.resnet18(), path)  # a whole pickled model
    with pytest.raises(InvalidRequestError,
                       match="holds a pickled torchvision.models.resnet.ResNet, .*; save model.state_dict"):
        create_backbone("resnet18", weights=str(path))
    torch.save({"fc.bias": torch.zeros(2), "x": _RunsCode(tmp_path / "ran")}, path)  # code, e.g. os.system
    with pytest.raises(InvalidRequestError, match=r"holds a pickled os\.makedirs, .*not loaded for safety"):
        create_backbone("resnet18", weights=str(path))
    assert not (tmp_path / "ran").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, yet such files abound
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not torch's "dispatching to torch.jit.load" either
        with pytest.raises(InvalidRequestError, match="a TorchScript archive .*; save model.state_dict"):
            create_backbone("resnet18", weights=str(path))
    path.write_bytes(bytes(range(256)) * 8)  # not a checkpoint at all
    with pytest.raises(InvalidRequestError, match="not a PyTorch file, or a damaged one$"):
        create_backbone("resnet18", weights=str(path))
    for text in (b"corrupt\n", b"cat\n"):  # a "c" is pickle's GLOBAL opcode: not "a pickled orrupt."
        path.write_bytes(text)
        with pytest.raises(InvalidRequestError, match="not a PyTorch file, or a damaged one$"):
            create_backbone("resnet18", weights=str(path))
    path.write_bytes(b"")
    with pytest.raises(InvalidRequestError, match="the file is empty or cut short"):
        create_backbone("resnet18", weights=str(path))


def test_checkpoint_without_the_imagenet_classifier_embeds(tmp_path: Path) -> None:
    import torchvision

    # Fine-tuned for 5 classes, or saved without the head, or by Lightning ("model." prefix).
    tuned = torchvision.models.resnet18(num_classes=5).state_dict()
    headless = {k: v for k, v in tuned.items() if not k.startswith("fc.")}
    for name, sd in (("tuned", tuned), ("headless", headless),
                     ("lightning", {f"model.{k}": v for k, v in headless.items()})):
        torch.save(sd, tmp_path / f"{name}.pth")
        net = create_backbone("resnet18", weights=str(tmp_path / f"{name}.pth"))
        assert net.classes is None  # no ImageNet labels, no logits: embeddings only
        with torch.inference_mode():
            fmap, logits = net(torch.randn(1, 3, 64, 64))
        assert fmap.shape[1] == 512 and logits is None
        assert torch.equal(net.state_dict()["extractor.layer1.0.conv1.weight"], tuned["layer1.0.conv1.weight"])
    # A head of another structure (Dropout + Linear, as transfer-learning tutorials write it),
    # an MLP head; wrapper prefixes (torch.compile's, nested, a backbone attribute); beside
    # the weights the plain data training scripts keep (timm's argparse args, numpy metrics).
    import argparse

    seq = torchvision.models.resnet18()
    seq.fc = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(512, 10))
    mlp = torchvision.models.mobilenet_v3_small()
    mlp.classifier = torch.nn.Sequential(torch.nn.Linear(576, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    for name, arch, sd in (
        ("seqhead", "resnet18", seq.state_dict()),
        ("mlphead", "mobilenet_v3_small", mlp.state_dict()),
        ("compiled", "resnet18", {f"_orig_mod.{k}": v for k, v in tuned.items()}),
        ("nested", "resnet18", {f"module.model.{k}": v for k, v in tuned.items()}),
        ("attribute", "resnet18", {f"backbone.{k}": v for k, v in tuned.items()} | {"loss.weight": torch.ones(5)}),
        ("timm-train", "resnet18", {"state_dict": tuned, "args": argparse.Namespace(lr=0.1, model="resnet18"),
                                    "metric": np.float64(0.93), "history": np.zeros(3), "epoch": 7}),
    ):
        torch.save(sd, tmp_path / f"{name}.pth")
        net = create_backbone(arch, weights=str(tmp_path / f"{name}.pth"))
        assert net.classes is None, name
        source = seq if name == "seqhead" else mlp if name == "mlphead" else None
        first = "features.0.0.weight" if arch == "mobilenet_v3_small" else "layer1.0.conv1.weight"
        expected = tuned[first] if source is None else source.state_dict()[first]
        assert torch.equal(net.state_dict()[f"extractor.{first}"], expected), name
    # Code pickled beside the weights is still refused.
    torch.save({"state_dict": tuned, "model_obj": torchvision.models.resnet18()}, tmp_path / "code.pth")
    with pytest.raises(InvalidRequestError, match="holds a pickled torchvision.models.resnet.ResNet"):
        create_backbone("resnet18", weights=str(tmp_path / "code.pth"))
    # A classifier with hidden layers (MobileNetV3's) may be missing whole.
    sd = {k: v for k, v in torchvision.models.mobilenet_v3_small().state_dict().items()
          if not k.startswith("classifier.")}
    torch.save(sd, tmp_path / "mobilenet.pth")
    assert create_backbone("mobilenet_v3_small", weights=str(tmp_path / "mobilenet.pth")).classes is None
    # ConvNeXt's embedding is taken after the classifier's LayerNorm: that one must be there.
    sd = {k: v for k, v in torchvision.models.convnext_tiny().state_dict().items()
          if not k.startswith("classifier.")}
    torch.save(sd, tmp_path / "convnext.pth")
    with pytest.raises(InvalidRequestError, match=r"missing \['classifier.0.weight', 'classifier.0.bias'\]"):
        create_backbone("convnext_tiny", weights=str(tmp_path / "convnext.pth"))
    # Whole, it makes ImageNet logits; that LayerNorm is still the embedding's, and fine-tuning
    # trains it (it stayed frozen as part of the classifier).
    from pictor.trainer.finetune import unfreeze_last

    torch.save(torchvision.models.convnext_tiny().state_dict(), tmp_path / "convnext.pth")
    convnext = create_backbone("convnext_tiny", weights=str(tmp_path / "convnext.pth"))
    assert convnext.classes is not None
    assert convnext.classifier_parameter_names() == {"extractor.classifier.2.weight", "extractor.classifier.2.bias"}
    assert "extractor.classifier.0.weight" in unfreeze_last(convnext, 1)
    # timm's classifier is the module its pretrained_cfg names ("classifier" here).
    import timm

    torch.save(timm.create_model("tf_efficientnet_lite0", num_classes=5).state_dict(), tmp_path / "lite.pth")
    assert create_backbone("efficientnet_lite0", weights=str(tmp_path / "lite.pth")).classes is None
    # A distilled model has two (the last Linear alone would be one of them).
    deit = timm.create_model("deit_tiny_distilled_patch16_224")
    assert checkpoints.classifier_prefixes(deit, get_backbone_info("seresnet50")) == (("head.", "head_dist."), ())


def test_stages_input_to_output() -> None:
    resnet = create_backbone("resnet18", "random")
    assert resnet.stages() == [f"extractor.layer{i}" for i in range(1, 5)]
    assert resnet.classifier_parameter_names() == set()  # no logits: the extractor left fc out
    # GoogLeNet's stages are its own modules; VGG's plain run of layers is counted in blocks
    # that end at a pooling layer (a "stage" there would be one BatchNorm).
    assert create_backbone("googlenet", "random").stages()[-3:] == [f"extractor.inception{s}" for s in ("4e", "5a", "5b")]
    assert create_backbone("vgg11_bn", "random").stages() == [f"extractor.features.{i}" for i in (0, 4, 8, 15, 22)]
    # DenseNet's last stage is its last dense block, with the norm after it.
    assert create_backbone("densenet121", "random").stages()[-1] == "extractor.features.denseblock4"
    # A layer before the last: the extractor ends there, and so do the stages.
    assert create_backbone("resnet18", "random", layer="layer3").stages()[-1] == "extractor.layer3"


@pytest.mark.parametrize("name", ["seresnet50", "efficientnet_lite0"])  # one per timm family
def test_timm_stages_are_timms_own_stage_groups(name: str) -> None:
    """The registered stages start where timm's coarse parameter groups (stem, stages, head) do."""
    from timm.models import group_parameters

    net = create_backbone(name, "random")
    model: Any = net.model
    groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    firsts = [next(n for n, _ in net.named_parameters() if n.startswith(s + ".")) for s in net.stages()]
    assert firsts == [f"model.{g[0]}" for g in groups[1:-1]]
    assert net.classifier_parameter_names() == {f"model.{n}" for n in groups[-1]}


def test_densenet_file_in_torchvisions_published_key_layout_loads(tmp_path: Path) -> None:
    import torchvision

    # torchvision's DenseNet downloads say "norm.1" where the model says "norm1" (and, older
    # than BatchNorm's counter, have no num_batches_tracked).
    sd = torchvision.models.densenet121().state_dict()
    published = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
                 for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in published
    torch.save(published, tmp_path / "densenet121-a639ec97.pth")
    net = create_backbone("densenet121", weights=str(tmp_path / "densenet121-a639ec97.pth"))
    assert torch.equal(net.state_dict()["extractor.features.denseblock1.denselayer1.norm1.weight"],
                       sd["features.denseblock1.denselayer1.norm1.weight"])


def test_random_init_is_the_same_network_everywhere() -> None:
    # index, serve and train build "random" in separate processes: they must agree.
    torch.manual_seed(123)
    before = torch.rand(1)
    a, b = create_backbone("resnet18", weights="random"), create_backbone("resnet18", weights="random")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the caller's random state is left alone


def test_offline_package_file_as_checkpoint_matches_offline() -> None:
    path = bb._offline_package_file()
    assert path is not None
    a = create_backbone("efficientnet_lite0")
    b = create_backbone("efficientnet_lite0", weights=str(path))
    assert a.weights == "offline" and b.weights.startswith("file:")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(a(x)[1], b(x)[1])


def test_torchvision_layer_choice() -> None:
    net = create_backbone("resnet18", weights="random", layer="layer3")
    with torch.inference_mode():
        fmap, _ = net(torch.randn(1, 3, 64, 64))
    assert net.dim == fmap.shape[1] == 256 and net.layer == "layer3"
    # The top-level layers once each, in the network's order.
    with pytest.raises(InvalidRequestError, match=r"layers: x, conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool"):
        create_backbone("resnet18", weights="random", layer="layer9")


def test_convnext_pools_then_normalises_like_its_head() -> None:
    net = create_backbone("convnext_tiny", weights="random")
    pooled = torch.randn(2, 768) * 5 + 3
    out = net.pooled_head(pooled)
    assert out.shape == (2, 768) and not torch.allclose(out, pooled)


def test_complexity_counts_params_and_flops() -> None:
    c = bb.complexity("resnet50")  # torchvision's published figures
    assert (c.input_size, c.params) == (224, 25_557_032) and abs(c.gflops - 4.089) < 0.01
    counted = bb.count_complexity("resnet50")  # same convention when we count ourselves
    assert counted.params == c.params and abs(counted.gflops - c.gflops) < 0.05
    lite = bb.complexity("efficientnet_lite0")
    assert 4_500_000 < lite.params < 5_000_000 and 0.3 < lite.gflops < 0.45
    r = bb.count_complexity("regnet_y_400mf")  # built on CPU: its builder computes on tensors
    assert r.params == bb.complexity("regnet_y_400mf").params


def test_models_command_rows_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pictor.core.cli import format_table, model_rows

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rows = model_rows("efficientnet-lite")
    assert [r["name"] for r in rows] == [f"efficientnet_lite{i}" for i in range(5)]
    lite0 = rows[0]
    assert (lite0["dim"], lite0["default_weights"], lite0["offline"], lite0["input"]) == (
        1280, "offline", True, 224)
    assert (tmp_path / "pictor" / "backbone-costs.json").is_file()  # the next run is instant
    assert model_rows("efficientnet-lite") == rows
    table = format_table(rows)
    assert table.splitlines()[0].split()[:3] == ["name", "family", "dim"]
    assert "efficientnet_lite0" in table and "yes" in table
    with pytest.raises(NotFoundError, match="families: .*ResNet"):
        model_rows("nope")
    assert [r["name"] for r in model_rows("inception")] == [r["name"] for r in model_rows("GoogLeNet")]
    assert {r["family"] for r in model_rows("mobilenet")} == {"MobileNetV3"}  # a part of the name
    assert {r["family"] for r in model_rows("senet")} == {"SENet"}  # the start of a word: not DenseNet


def test_cli_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, pictor.core.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_torchvision_weights_from_torch_hub_cache(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("PICTOR_OFFLINE", "1")  # proves the cache is read without any network
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = hub.tv_cache_path(enum.url)
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    cached.parent.mkdir(parents=True)
    published = torchvision.models.resnet18()  # stands in for the published file
    torch.save(published.state_dict(), cached)
    assert bb.weights_available_offline("resnet18", "IMAGENET1K_V1")
    net = create_backbone("resnet18", weights="IMAGENET1K_V1")
    assert net.weights == "IMAGENET1K_V1" and net.classes is not None
    assert net.preprocessing.resize_size == 256 and net.preprocessing.input_size == 224
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(net(x)[1], published.eval()(x), atol=1e-5)
    cached.write_bytes(cached.read_bytes()[:1000])  # a download cut short
    with pytest.raises(WeightsUnavailableError, match="does not load: .*a damaged one; delete it so it is fetched again"):
        create_backbone("resnet18", weights="IMAGENET1K_V1")
    # A file put in the cache is read as safely as a checkpoint: torchvision's own loader
    # unpickles it whole, and the code in it would run.
    torch.save({**published.state_dict(), "x": _RunsCode(tmp_path / "ran")}, cached)
    with pytest.raises(WeightsUnavailableError, match="does not load: .*pickled .*not loaded for safety"):
        create_backbone("resnet18", weights="DEFAULT")
    assert not (tmp_path / "ran").exists()


def test_timm_weights_from_hugging_face_cache(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("PICTOR_OFFLINE", "1")
    repo = tmp_path / "models--timm--tf_efficientnet_lite1.in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    published = timm.create_model("tf_efficientnet_lite1")
    save_file(published.state_dict(), str(snap / "model.safetensors"))
    assert bb.weights_available_offline("efficientnet_lite1")
    net = create_backbone("efficientnet_lite1")
    assert net.weights == "in1k" and net.classes is not None
    p = net.preprocessing  # from timm's pretrained_cfg: 240 px, crop_pct 0.882, bicubic
    assert (p.input_size, p.resize_size, p.interpolation) == (240, 272, "bicubic")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(net(x)[1], published.eval()(x), atol=1e-5)


def test_googlenet_checkpoint_gets_the_input_shift_of_its_official_weights(tmp_path: Path) -> None:
    import torchvision

    # torchvision builds GoogLeNet with transform_input=True for its official weights; a copy
    # of them loaded from a file must embed the same way as from torch hub's cache.
    official = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                            transform_input=True).eval()
    torch.save(official.state_dict(), tmp_path / "googlenet.pth")
    net = create_backbone("googlenet", weights=str(tmp_path / "googlenet.pth"))
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        assert torch.allclose(net(x)[1], official(x), atol=1e-4)
