"""Packaging facts a user relies on: SPDX license and its file, typed package, declared lower bounds
equal to what the minimum-versions CI leg installs, and documentation that exists where code cites it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_is_an_spdx_string_with_its_file_and_the_package_is_typed():
    project = _pyproject()
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert (ROOT / "lightning_ulysses" / "py.typed").is_file()
    assert "Typing :: Typed" in project["classifiers"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # superseded by the SPDX string


# Extras the dev extra pulls in, so the minimum-versions leg installs (and tests) their lower bounds too.
TESTED_EXTRAS = ("cli", "plots")


def test_minimum_versions_leg_installs_exactly_the_declared_lower_bounds():
    project = _pyproject()
    extras = project["optional-dependencies"]
    assert f"lightning-ulysses[{','.join(TESTED_EXTRAS)}]" in extras["dev"]
    lower = {}
    for requirement in [*project["dependencies"], *(r for name in TESTED_EXTRAS for r in extras[name])]:
        match = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?.*?>=\s*([0-9.]+)", requirement)
        assert match, f"{requirement}: every dependency needs a lower bound the minimum leg can test"
        lower[match.group(1)] = match.group(2)
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([0-9.]+)\s*$", (ROOT / "constraints-min.txt").read_text(), re.M))
    assert pins == lower
    assert "constraints-min.txt" in (ROOT / ".ci" / "run").read_text()


def test_code_cites_only_documents_in_the_repository():
    cited = set()
    for path in [*ROOT.glob("lightning_ulysses/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py"),
                 ROOT / "README.md", *ROOT.glob("docs/*.md")]:
        text = path.read_text()
        assert "DESIGN" not in text, f"{path.relative_to(ROOT)} cites a document that is not in the repository"
        cited |= set(re.findall(r"docs/[\w.-]+\.md", text))
    assert cited, "no citation of docs/ found"
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert missing == []


def test_jsonargparse_is_an_extra_because_the_library_never_imports_it():
    project = _pyproject()
    assert not any(r.startswith("jsonargparse") for r in project["dependencies"])
    assert any(r.startswith("jsonargparse") for r in project["optional-dependencies"]["cli"])
    importers = [p.relative_to(ROOT) for p in ROOT.glob("lightning_ulysses/**/*.py")
                 if re.search(r"^\s*(import|from)\s+(jsonargparse|lightning\.pytorch\.cli)\b", p.read_text(), re.M)]
    assert importers == []
    # the ones who need it are told: the example's docstring and the README's CLI section
    assert '.[cli]' in (ROOT / "examples" / "train.py").read_text()
    readme = (ROOT / "README.md").read_text()
    assert '.[cli]' in readme[readme.index("### From a LightningCLI YAML"):]
