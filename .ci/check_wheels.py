"""CI: the wheels install without -e and every module imports from them.

Usage: python .ci/check_wheels.py DIST_DIR. DIST_DIR holds the jquant and jquant-models wheels
(``pip wheel --no-deps -w DIST_DIR . ./packages/jquant-models``). They are installed with
``--no-deps --target`` into a fresh folder, and a separate interpreter whose only jquant is that
folder (it runs there, with PYTHONPATH pointing at it) imports every module of jquant,
jquant.models and jquant.pallas_kernels and finds the bundled models. The library wheel must stay
under ``MAX_LIBRARY_MB``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

MAX_LIBRARY_MB = 10.0

PROBE = r"""
import importlib, pkgutil, sys
from pathlib import Path
import jquant, jquant.models, jquant.pallas_kernels
root = Path(sys.argv[1]).resolve()
for pkg in (jquant, jquant.models, jquant.pallas_kernels):
    assert Path(pkg.__file__).resolve().is_relative_to(root), f"{pkg.__name__} imported from {pkg.__file__}, not the wheel"
names = sorted({m.name for pkg in (jquant, jquant.models, jquant.pallas_kernels)
                for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
                if ".assets." not in m.name})
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as err:  # report every module that does not import, then fail
        failed.append(f"{name}: {type(err).__name__}: {err}")
models = [m.name for m in jquant.models.list_models()]
print(f"imported {len(names) - len(failed)} of {len(names)} modules from the wheels; bundled models: {models}")
assert not failed, "\n".join(failed)
assert "jq-llama-tiny" in models, "the jquant-models wheel does not provide jq-llama-tiny"
"""


def main(dist: str) -> None:
    wheels = sorted(Path(dist).glob("*.whl"))
    library = [w for w in wheels if w.name.startswith("jquant-")]
    if len(library) != 1 or not any(w.name.startswith("jquant_models-") for w in wheels):
        raise SystemExit(f"{dist}: expected one jquant and one jquant_models wheel, found {[w.name for w in wheels]}")
    for wheel in wheels:
        print(f"{wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB")
    size_mb = library[0].stat().st_size / 1e6
    if size_mb > MAX_LIBRARY_MB:
        raise SystemExit(f"the library wheel is {size_mb:.1f} MB, over {MAX_LIBRARY_MB} MB: keep data out of it")
    with tempfile.TemporaryDirectory() as target:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, *map(str, wheels)],
                       check=True)
        subprocess.run([sys.executable, "-c", PROBE, target], check=True, cwd=target, env={"PYTHONPATH": target,
                       "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


if __name__ == "__main__":
    main(sys.argv[1])
