"""The installable package: after ``pip install -e .`` a script outside the repository creates Focal models
through timm by importing ``focal_transformer`` alone, and the generic name ``models`` stays unclaimed; the
README's offline ways of loading weights through timm work."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import warnings
from pathlib import Path

import pytest

from tests.helpers import REPO, randomise

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


def readme_loading_calls() -> list:
    """The ``timm.create_model`` calls of the README's code that load weights from a file."""
    code = "\n".join(re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S))
    return [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)
            and ast.unparse(node.func) == "timm.create_model"
            and {k.arg for k in node.keywords} & {"checkpoint_path", "pretrained_cfg_overlay"}]


def test_the_readme_s_offline_loading_calls_load_the_file_s_weights(tmp_path):
    """Each call as the README writes it, with its file name replaced by a file of the fixture's small
    architecture: the released layout (index tables and all) through ``pretrained_cfg_overlay``, a checkpoint of
    main.py through both forms."""
    import timm
    import torch

    from models import FocalTransformer, load_weights
    from tools.golden import FIXTURES, load_case

    case = load_case(FIXTURES / "small_fc_224.json")
    small = dict({k.lower(): v for k, v in case["focal"].items()}, num_classes=case["num_classes"])
    released = FIXTURES / "small_fc_224.pth"
    ours = randomise(timm.create_model("focal_tiny_patch4_window7_224", **small), std=0.1)
    torch.save({"model": ours.state_dict(), "epoch": 299}, tmp_path / "ckpt.pth")
    expected = timm.create_model("focal_tiny_patch4_window7_224", **small)
    load_weights(expected, torch.load(released, weights_only=True))
    calls = readme_loading_calls()
    assert sorted(k.arg for call in calls for k in call.keywords) == ["checkpoint_path", "pretrained",
                                                                      "pretrained_cfg_overlay"]
    for call in calls:
        files = [(tmp_path / "ckpt.pth", ours)]
        if any(k.arg == "pretrained_cfg_overlay" for k in call.keywords):
            files.append((released, expected))
        for path, want in files:
            source = re.sub(r"'[^']+\.pth'", repr(str(path)), ast.unparse(call))
            def create(*args, **kwargs):  # the README's call at the fixture's size
                return timm.create_model(*args, **kwargs, **small)
            model = eval(source.replace("timm.create_model(", "create("), {"dict": dict, "create": create})
            assert isinstance(model, FocalTransformer)
            got = model.state_dict()
            # timm starts the classifier afresh where the model's class count (the fixture's 10) is not the
            # pretrained config's (1000), as for its own models; the README says how to keep it
            fresh = ("head.",) if "pretrained_cfg_overlay" in source else ()
            assert all(torch.equal(got[k], v) for k, v in want.state_dict().items() if not k.startswith(fresh)), \
                (source, path)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("index", ["", "https://download.pytorch.org/whl/cpu"])
def test_make_venv_takes_torch_from_the_index_named(index):
    """``TORCH_INDEX`` names the index of torch and torchvision (PyTorch's CPU-only wheels for a machine without
    a GPU); by default pip's own, which on the project's machines holds the wheels locally."""
    run = subprocess.run(["make", "-n", "-B", "venv", f"TORCH_INDEX={index}"], cwd=REPO, capture_output=True,
                         text=True, check=True)
    words = next(line for line in run.stdout.splitlines() if "pip install" in line and "torch==" in line).split()
    assert words[words.index("install") + 1:-2] == ["--quiet", *(["--index-url", index] if index else [])]
    assert [word.split("==")[0] for word in words[-2:]] == ["torch", "torchvision"]
