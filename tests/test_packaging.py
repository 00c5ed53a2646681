"""``pip install .`` (not editable) ships every package of the source tree."""
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def configured_packages():
    """The packages pyproject.toml's [tool.setuptools] section puts in the wheel."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    if isinstance(tool.get("packages"), list):
        return set(tool["packages"])
    find = tool["packages"]["find"]
    return set(find_packages(where=str(ROOT), include=find.get("include", ["*"]),
                             exclude=find.get("exclude", ())))


def test_every_source_package_is_installed():
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "dmlcore").rglob("__init__.py")}
    assert on_disk - configured_packages() == set()
