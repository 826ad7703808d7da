"""Packaging: environment.yml and pyproject.toml agree, every dependency floor is a version the
tests ran with (constraints/floor.txt, installed by .ci/run), and the metadata builds cleanly."""

import re
import warnings
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
FLOOR = ROOT / "constraints" / "floor.txt"


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> list[Requirement]:
    project = _project()
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def _floor_pins() -> dict[str, str]:
    pins = {}
    for line in FLOOR.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower()] = Version(spec.version)
    return pins


def test_environment_yml_matches_pyproject():
    project = _project()
    wanted = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted |= set(extra)
    text = (ROOT / "environment.yml").read_text().split("  - pip:", 1)[1]
    listed = set()
    for line in text.splitlines():
        m = re.match(r"^\s+- ([A-Za-z].*)$", line)
        if m:
            listed.add(m.group(1).strip())
    assert {_norm(r) for r in wanted} == {_norm(r) for r in listed}


def test_every_dependency_floor_is_pinned_in_the_floor_constraints():
    """Each dependency is `name>=floor`, and constraints/floor.txt pins exactly that floor, so the
    CI step that installs with those constraints tests the oldest versions a user may get."""
    pins = _floor_pins()
    for req in _requirements():
        (spec,) = req.specifier  # one lower bound, no upper bound and no pin
        assert spec.operator == ">=", f"{req}: give a floor (>=), not {spec.operator}"
        assert pins.get(req.name.lower()) == Version(spec.version), (
            f"{req}: constraints/floor.txt must pin {req.name}=={spec.version}")
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    (setuptools,) = [Requirement(r) for r in build if r.startswith("setuptools")]
    (spec,) = setuptools.specifier
    assert pins.get("setuptools") == Version(spec.version)  # the floor build uses this one


def test_torch_is_a_floor_not_a_pin():
    deps = [Requirement(r) for r in _project()["dependencies"]]
    (torch,) = [r for r in deps if r.name == "torch"]
    # a pinned torch would pull a multi-GB CUDA build over a working one (Colab, a CPU machine)
    assert [s.operator for s in torch.specifier] == [">="]


def test_ci_runs_the_unit_tests_on_the_floor_versions():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "constraints/floor.txt" in ci and "--no-build-isolation" in ci
    assert re.search(r"pytest tests\b", ci)


def test_license_is_an_spdx_expression_that_setuptools_reads_without_warnings():
    """`project.license` as a table is deprecated (setuptools warns on every install)."""
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    assert _project()["license"] == "BSD-3-Clause"
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("setuptools < 77 cannot read a license expression (the build requires 77)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
    deprecations = [str(w.message).splitlines()[0] for w in caught  # setuptools' own, not those
                    if w.category.__name__ == "SetuptoolsDeprecationWarning"]  # of plugins
    assert not deprecations


def test_every_subpackage_is_packaged():
    """A plain `pip install .` (a wheel, not an editable install) must ship `toyworld/`,
    `exercises/` and any other subpackage, not only the top-level modules."""
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    found = {init.parent.relative_to(ROOT).as_posix().replace("/", ".")
             for init in (ROOT / "minigpt4_lite").rglob("__init__.py")}
    assert {"minigpt4_lite.toyworld", "minigpt4_lite.exercises"} <= found
    assert found <= set(dist.packages), f"not packaged: {sorted(found - set(dist.packages))}"
