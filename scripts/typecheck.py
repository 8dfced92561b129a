"""mypy over pictor's modules under their import names (`make typecheck`; arguments go to mypy).

The top-level folders are the pictor.* packages only through [tool.setuptools] package-dir, which
the editable install applies with an import hook that mypy cannot follow: checked in place,
core/store.py is module ``core.store``, and every ``import pictor.core...`` reaches mypy as Any.
So this lays package-dir out as symlinks in build/typecheck/ (folders linked whole, so a new
module needs no rebuild), where [tool.mypy] checks them, and reports errors at the real paths.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = Path("build/typecheck")  # under ROOT; [tool.mypy] mypy_path and files name it too


def build_tree(package_dir: dict[str, str]) -> None:
    shutil.rmtree(TREE, ignore_errors=True)
    for name, folder in sorted(package_dir.items()):  # a package before its subpackages
        dest = TREE.joinpath(*name.split("."))
        if any(other.startswith(name + ".") for other in package_dir):
            # Its subpackages are linked in beside its own entries: a folder of links.
            dest.mkdir(parents=True)
            for entry in Path(folder).iterdir():
                if entry.name != "__pycache__":
                    (dest / entry.name).symlink_to(os.path.relpath(entry, dest))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(os.path.relpath(folder, dest.parent), target_is_directory=True)


def main() -> int:
    os.chdir(ROOT)
    config = tomllib.loads(Path("pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    excludes: list[str] = config["tool"]["mypy"]["exclude"]
    # Crawled in place as well, a folder's files would be checked twice, under two module names.
    if missed := [f for f in package_dir.values() if not any(re.search(x, f + "/") for x in excludes)]:
        sys.exit(f"[tool.mypy] exclude must cover every package-dir folder; it misses {missed}")
    build_tree(package_dir)
    # A process of its own, not mypy.api.run: mypy's command line exits without freeing its
    # module graph, which in-process took about 15 s more on a cold run of 20.
    mypy = subprocess.run([sys.executable, "-m", "mypy", *sys.argv[1:]], capture_output=True, text=True)
    real = re.compile(rf"^{re.escape(TREE.as_posix())}/\S+?\.pyi?(?=:)", re.MULTILINE)
    sys.stdout.write(real.sub(lambda m: os.path.relpath(os.path.realpath(m[0])), mypy.stdout))
    sys.stderr.write(mypy.stderr)
    return mypy.returncode


if __name__ == "__main__":
    sys.exit(main())
