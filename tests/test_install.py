"""Installing as the README says: CI runs the README's set-up commands, and an editable
install runs as `python -m noodle` from the folder that holds the clone."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO

CI_MARKER = "# --- README: set-up (CPU machine) ---"


def readme_setup_commands() -> list[list[str]]:
    """The commands of the README's first shell block (set-up and tests), as words."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README.md has no ```bash block"
    return [words for line in block[1].splitlines() if (words := shlex.split(line, True))]


def ci_commands() -> list[list[str]]:
    """The commands .ci/run runs from its set-up marker on, as words."""
    script = (REPO / ".ci" / "run").read_text()
    assert CI_MARKER in script
    lines = script.partition(CI_MARKER)[2].splitlines()
    return [words for line in lines if (words := shlex.split(line, comments=True))]


def test_ci_runs_exactly_the_readme_set_up_and_test_commands():
    readme = readme_setup_commands()
    assert ci_commands() == readme
    # Two lines: one installs (PyTorch's CPU build from PyTorch's index, then noodle), one
    # runs the tests.
    assert readme == [
        [
            *("pip", "install", "torch==2.13.0"),
            *("--index-url", "https://download.pytorch.org/whl/cpu"),
            *("&&", "pip", "install", "-e", ".[dev]"),
        ],
        ["python", "-m", "pytest"],
    ]


def site_packages() -> list[str]:
    return [path for path in sys.path if path.endswith("site-packages")]


def test_python_m_noodle_runs_from_the_folder_that_holds_a_clone_named_noodle(tmp_path):
    """From the folder holding a clone called noodle/, that clone comes first on sys.path;
    an editable install must still import the package inside it, not take the clone for a
    namespace package (setuptools' import-hook editable installs did)."""
    clone = tmp_path / "noodle"
    clone.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE.md"):
        shutil.copy(REPO / name, clone / name)
    shutil.copytree(REPO / "noodle", clone / "noodle", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = "import sys; from setuptools import build_meta; build_meta.build_editable(sys.argv[1])"
    built = subprocess.run(
        [sys.executable, "-c", build, str(wheels)],
        cwd=clone,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    site = tmp_path / "site"
    for wheel in wheels.glob("*.whl"):
        zipfile.ZipFile(wheel).extractall(site)

    # Like `python -m noodle --version` run in tmp_path (whose noodle/ is the clone), in an
    # environment where noodle is installed from that wheel only: without `site`, so the
    # test environment's own install of noodle is not loaded, but with its packages (after
    # the wheel's, whose import hook, if any, has the same module name as theirs).
    run_as_installed = (
        "import runpy, site, sys; "
        f"site.addsitedir({str(site)!r}); sys.path += {site_packages()!r}; "
        "runpy.run_module('noodle', run_name='__main__', alter_sys=True)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", run_as_installed, "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("noodle ")
