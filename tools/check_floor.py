"""Install the lowest versions pyproject.toml claims into a throwaway venv and smoke-test them.

    python tools/check_floor.py [--python python3.11] [--keep DIR] [--demo]

By hand only (never in CI: it downloads torch and its CUDA libraries, several GB). For every
``name>=X`` of ``[project] dependencies`` it installs ``name==X`` (with pip resolving what
those need), installs mrlcache itself without dependencies, then runs the smoke: import
every module, ``mrlcache --help``, and with ``--demo`` the whole quick demo (extract into a
zarr cache, fit, eer). It prints the installed versions and the verdict; record the result
in docs/getting-started.md ("Lowest versions"). ``--python`` below ``requires-python`` must fail at
the resolution step, which is the point of checking it too.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def floors() -> list[str]:
    """``name==X`` for every ``name>=X`` dependency (markers and comments dropped)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = []
    for dep in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", dep)
        if not m:
            raise SystemExit(f"pyproject.toml: {dep!r} has no '>=' floor; give one")
        out.append(f"{m.group(1)}=={m.group(2)}")
    return out


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


SMOKE = """
import importlib, pkgutil, sys
import mrlcache
names = [m.name for m in pkgutil.walk_packages(mrlcache.__path__, 'mrlcache.') if m.name != 'mrlcache.__main__']
for name in names:
    importlib.import_module(name)
print(f'imported {len(names)} modules')
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter of the venv")
    parser.add_argument("--keep", type=Path, help="build the venv here and keep it")
    parser.add_argument("--demo", action="store_true", help="also run 'mrlcache demo --quick'")
    args = parser.parse_args()
    where = args.keep or Path(tempfile.mkdtemp(prefix="mrlcache-floor-"))
    venv = where / "venv"
    run([args.python, "-m", "venv", venv])
    py = venv / "bin" / "python"
    pins = floors()
    run([py, "-m", "pip", "install", "-q", *pins])
    run([py, "-m", "pip", "install", "-q", "--no-deps", ROOT])
    run([py, "-c", SMOKE])
    run([venv / "bin" / "mrlcache", "--help"], stdout=subprocess.DEVNULL)
    if args.demo:
        run([venv / "bin" / "mrlcache", "demo", "--quick", "--out", where / "demo"])
    versions = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    wanted = {p.split("==")[0].lower().replace("_", "-") for p in pins}
    print("installed floors:")
    for line in versions.splitlines():
        if line.split("==")[0].lower().replace("_", "-") in wanted:
            print("  " + line)
    print(f"floor check passed with {subprocess.run([py, '--version'], capture_output=True, text=True).stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
