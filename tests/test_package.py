"""The installable package: after ``pip install -e .`` a script outside the repository creates Focal models
through timm by importing ``focal_transformer`` alone, and the generic name ``models`` stays unclaimed."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import warnings
from pathlib import Path

import pytest

from tests.helpers import REPO

USER_SCRIPT = """
import timm, torch
import focal_transformer
torch.manual_seed(0)
assert "focal_tiny_patch4_window7_224" in timm.list_models("focal*")
small = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
model = timm.create_model("focal_tiny_patch4_window7_224", num_classes=3, **small).eval()
print("logits", tuple(model(torch.randn(2, 3, 224, 224)).shape))
backbone = timm.create_model("focalv2_tiny_useconv_patch4_window7_224", features_only=True, out_indices=(1, 3), **small)
print("features", [tuple(f.shape) for f in backbone(torch.randn(1, 3, 224, 224))])
print("class", type(model).__module__, isinstance(model, focal_transformer.FocalTransformer))
try:
    import models
    print("models importable")
except ModuleNotFoundError:
    print("models unclaimed")
"""


def make_venv(root: Path) -> Path:
    """A fresh virtual environment that sees this one's packages (torch, timm, setuptools) through a .pth file,
    so that installing the package into it needs no network."""
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    parents = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "parent_environment.pth").write_text("\n".join(sorted(parents)) + "\n")
    return python


@pytest.mark.slow
def test_script_outside_the_repository_creates_models_through_timm(tmp_path):
    python = make_venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "-e", str(REPO)], check=True, capture_output=True, text=True)
    outside = tmp_path / "project"
    outside.mkdir()
    (outside / "use_focal.py").write_text(USER_SCRIPT)
    run = subprocess.run([str(python), "-W", "error", "use_focal.py"], cwd=outside, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "logits (2, 3)" in run.stdout
    assert "features [(1, 32, 28, 28), (1, 128, 7, 7)]" in run.stdout
    assert "class focal_transformer.models.focal_transformer True" in run.stdout
    assert "models unclaimed" in run.stdout


def test_package_shares_the_imported_tree():
    """Imported where ``models`` already is (the repository, the tests), the package is the same modules, so timm
    sees each name registered once and isinstance checks agree."""
    import models
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered twice
        import focal_transformer
    assert focal_transformer.models is models
    assert focal_transformer.FocalTransformer is models.FocalTransformer
    assert focal_transformer.build_model is models.build_model
    assert set(focal_transformer.MODEL_NAMES) == set(models.registry.default_cfgs)


def test_another_projects_models_is_never_taken_for_ours(tmp_path):
    """Not installed, with a project's own ``models`` package first on the path: a clear ImportError, and that
    ``models`` is left alone."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("MINE = True\n")
    script = ("import sys\nsys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
              "try:\n    import focal_transformer\nexcept ImportError as err:\n    print(err)\n"
              "import models\nprint('mine' if models.MINE else 'ours')\n")
    # -S: without site-packages, as where the package is not installed (this environment has it installed)
    run = subprocess.run([sys.executable, "-S", "-c", script, str(tmp_path), str(REPO)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"focal_transformer is not installed and its models/ tree is not importable "
                                       f"here: run `pip install -e {REPO}`", "mine"]


def test_no_product_module_imports_the_tests():
    """The tests import the product, never the other way: a user's install has no tests/ to import."""
    import ast
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if parts[0] in ("tests", ".venv", "output") or parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "tests"]
    assert offenders == []
