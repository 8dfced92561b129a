"""The benches run to their tables: docs/benchmarks.md records their figures with the command
that made them, and a reader re-runs those commands. Each runs here as documented, in a
subprocess from the project root, on tiny data made here (never ../shared/datasets) and
with the flags that make it short; what is asserted is that it finishes and prints its
table, not its figures."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, drawn_image, make_gallery

pytestmark = pytest.mark.slow  # each loads torch (and most a model) in a fresh process


def run_bench(script: str, *args: object) -> str:
    done = subprocess.run([sys.executable, f"bench/{script}", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"bench/{script} failed:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three class folders of 16 drawn JPEGs each: enough for a 25% split and a class left out."""
    root = tmp_path_factory.mktemp("classes")
    for c in range(3):
        (root / f"c{c}").mkdir()
        for i in range(16):
            (root / f"c{c}" / f"{i:02d}.jpg").write_bytes(drawn_image(100 * c + i, 64, "JPEG"))
    return root


def test_transfer(classes: Path, tmp_path: Path) -> None:
    far = make_gallery(tmp_path / "far")
    out = run_bench("transfer.py", "--data", classes, "--modes", "linear,knn,finetune,openset,far",
                    "--epochs", 1, "--far-data", far, "--far-max", 4, "--cache-dir", tmp_path / "cache",
                    "--no-progress")
    assert "| linear |" in out and "| finetune |" in out and "| knn" in out
    assert "| mean |" in out and "far check" in out


def test_heldout(classes: Path) -> None:
    out = run_bench("heldout.py", "--data", classes, "--heldout", 0.25, "--seeds", 0)
    assert re.search(r"^\| 0 \| 12 \| [\d.]+ \| [\d.]+% \| [\d.]+ \| \d+ \|$", out, re.M), out


def test_open_set_layers(classes: Path) -> None:
    out = run_bench("open_set_layers.py", "--data", classes)
    assert "| embedding | 1280 |" in out and "| sum of all |" in out


def test_embed(classes: Path) -> None:
    out = run_bench("embed.py", "--data", classes, "--models", "resnet18", "--precisions", "fp32",
                    "--seconds", 0.3, "--decode-images", 4, "--big-images", 1)
    assert "| resnet18 | 224 |" in out and "x 12 MP JPEG" in out


def test_search(tmp_path: Path) -> None:
    out = run_bench("search.py", "--sizes", 3000, "--types", "Flat;HNSW32;IVF{nlist}_HNSW32,Flat;auto",
                    "--queries", 50, "--tune-queries", 50, "--train", 2000, "--single-budget", 0.3,
                    "--cache", tmp_path / "cache", "--tmp", tmp_path / "t", "--out", tmp_path / "new" / "rows.json")
    assert "| 3,000 | HNSW32 |" in out and "| 3,000 | auto (store) |" in out and "store overhead" in out
    rows = json.loads((tmp_path / "new" / "rows.json").read_text())
    assert len(rows) == 4 and rows[-1]["index"] == "auto (store)" and rows[-1]["size"] == 3000


def test_rebuild(tmp_path: Path) -> None:
    out = run_bench("rebuild.py", "--items", 700, "--index-type", "IVF16,Flat", "--dim", 32, "--extra", 5000,
                    "--interval", 0.01, "--tmp", tmp_path)
    assert "| background | 700 | Flat -> IVF16,Flat |" in out and "| in the write | 700 |" in out


def test_list(tmp_path: Path) -> None:
    out = run_bench("list.py", "--size", 500, "--tmp", tmp_path / "new")
    assert "500 items, pages of 1000" in out


def test_decode() -> None:
    out = run_bench("decode.py", "--max-pixels", 200_000)
    assert "| RGB PNG |" in out


def test_fuzz_decode(tmp_path: Path) -> None:
    out = run_bench("fuzz_decode.py", "--cases", 40, "--keep", tmp_path / "kept")
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF"):  # nothing but images and refusals
        assert re.search(rf"^\| {fmt} \| 40 \| \d+ \| \d+ \| 0 \| 0 \| 0 \|$", out, re.M), out
    assert not (tmp_path / "kept").exists()


def test_pca_rerank(classes: Path) -> None:
    out = run_bench("pca_rerank.py", "--data", classes, "--dims", "16,32", "--k-factors", "1,4",
                    "--queries", 8)
    assert "| PCA | variance kept | k_factor 1 | k_factor 4 |" in out and "\n| 32 |" in out


def test_whitening(tmp_path: Path) -> None:
    data = tmp_path / "emoji"  # the layout of ../shared/datasets/emoji: emoji.csv, <vendor>/*.png
    rows = []
    for i in range(40):
        name = f"e{i:02d}.png"
        for vendor, seed in (("google", i), ("twitter", i + 1000)):
            (data / vendor).mkdir(parents=True, exist_ok=True)
            (data / vendor / name).write_bytes(drawn_image(seed, 64))
        rows.append({"file": name, "category": f"cat{i % 4}", "has_img_google": "1", "has_img_twitter": "1"})
    with (data / "emoji.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = run_bench("whitening.py", "--data", data, "--dims", "16", "--fit-sizes", "20,all")
    assert "| none | 1280 | - |" in out and "| --pca-whiten 16 | 16 | 20 |" in out and "| --pca-whiten 16 | 16 | 40 |" in out


def test_server_options() -> None:
    out = run_bench("server_options.py", "--rounds", 1, "--calls", 5)
    assert "| health | 5 |" in out and "a scrape of /metrics" in out
    out = run_bench("server_options.py", "--option", "mtls", "--rounds", 1, "--calls", 5)
    assert "| health, new connection | 1 |" in out and "/metrics" not in out


def test_clients() -> None:
    out = run_bench("clients.py", "--calls", 20, "--concurrency", 2, "--upsert-items", 4)
    for client in ("PictorClient", "PictorAsyncClient"):
        assert f"| search by vector | {client} | 2 | 20 |" in out and f"| upsert of 4 | {client} | 1 | 2 |" in out


def test_batching() -> None:
    out = run_bench("batching.py", "--clients", "1,3", "--seconds", 3, "--model-seconds", 0.5)
    assert "model alone" in out and re.search(r"^\| 1 \| [0-9.]+ \| .* \| 0 \| 1\.0 \|$", out, re.M), out
    assert re.search(r"^\| 3 \| [0-9.]+ \| .* \| 0 \| [0-9.]+ \|$", out, re.M), out


def test_reload() -> None:
    out = run_bench("reload.py", "--clients", 2, "--seconds", 3, "--reload-every", 0.5)
    assert re.search(r"^\| none \| [0-9.]+ \| .* \| 0 \| - \|$", out, re.M), out
    assert re.search(r"^\| [1-9]\d*, one every 0.5 s \| [0-9.]+ \| .* \| 0 \| \d+, \d+ \|$", out, re.M), out


def test_health() -> None:
    out = run_bench("health.py", "--clients", 4, "--seconds", 5, "--burst-threads", 2, "--burst-calls", 4)
    assert "| health | flooded |" in out and "burst:" in out


def test_soak() -> None:
    # Exit 0 is the soak's verdict: no unexpected error, every acknowledged write read back, no
    # traceback in the server's log, SIGTERM answered with exit 0.
    out = run_bench("soak.py", "--seconds", 6, "--sample-every", 3)
    assert "| 6 |" in out and "| Upsert vector |" in out and "verdict: ok" in out
