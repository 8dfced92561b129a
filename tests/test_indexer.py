"""`pictor index`: embeds a gallery, skips and reports bad files, re-runs without duplicates."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import drawn_image, pictor

from pictor.core.store import IndexStore


def test_index_reports_bad_files_and_keeps_going(gallery: Path, tmp_path: Path) -> None:
    (gallery / "cool" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (gallery / "cool" / "empty.png").write_bytes(b"")
    out = tmp_path / "index"
    r = pictor("index", str(gallery), "--out", str(out), "--json", "--batch-size", "5")
    summary = json.loads(r.stdout)
    assert (summary["indexed"], summary["skipped"], summary["index_size"]) == (12, 2, 12)
    assert {Path(f["path"]).name for f in summary["failures"]} == {"broken.jpg", "empty.png"}
    assert all(f["error"] for f in summary["failures"])

    strict = pictor("index", str(gallery), "--out", str(out), "--strict", check=False)
    assert strict.returncode == 1

    with IndexStore.open(out) as store:
        assert len(store) == 12
        query = store.get_vector(sorted(gallery.rglob("img*.png"))[0].as_posix())
        labels = {h.label for h in store.search(query[None], 12)[0]}
        assert labels == {"warm", "cool"}


def test_rerun_replaces_instead_of_duplicating(gallery: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    pictor("index", str(gallery), "--out", str(out))
    (gallery / "warm" / "extra.png").write_bytes(drawn_image(99))
    summary = json.loads(pictor("index", str(gallery), "--out", str(out), "--json").stdout)
    assert (summary["inserted"], summary["replaced"], summary["index_size"]) == (1, 12, 13)


def test_index_refuses_another_backbone_on_existing_index(gallery: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    pictor("index", str(gallery), "--out", str(out))
    r = pictor("index", str(gallery), "--out", str(out), "--weights", "random", check=False)
    assert r.returncode == 2
    assert "rebuild" in r.stderr or "re-embed" in r.stderr


def test_index_errors_are_clear(tmp_path: Path) -> None:
    r = pictor("index", str(tmp_path / "nope"), "--out", str(tmp_path / "i"), check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    r = pictor("index", str(tmp_path / "empty"), "--out", str(tmp_path / "i"), check=False)
    assert r.returncode == 2 and "no images found" in r.stderr
