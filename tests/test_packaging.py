"""The wheel ships every subpackage: pyproject.toml lists them by hand (kernels/ and bench/
are mapped into the package), so a new folder must be listed too."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        config = tomllib.load(f)["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {"sparseft." + name if name != "." else "sparseft"
               for name in (os.path.relpath(d, os.path.join(ROOT, "sparseft")).replace(os.sep, ".")
                            for d, _, files in os.walk(os.path.join(ROOT, "sparseft")) if "__init__.py" in files)}
    mapped = {"sparseft.kernels", "sparseft.bench"}
    assert set(config["package-dir"]) == mapped
    assert on_disk | mapped <= listed, f"not in pyproject.toml's packages: {sorted(on_disk | mapped - listed)}"
