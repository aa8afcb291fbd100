"""fastmdm.kernels as a leaf package: what it imports, that fastmdm stands without triton, and
that ``import fastmdm.kernels`` works from a source tree however fastmdm was installed."""

import ast
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")


def run_python(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` from the repository root."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_kernels_import_only_the_standard_library_torch_triton_and_each_other():
    allowed = set(sys.stdlib_module_names) | {"torch", "triton"}
    for name in sorted(os.listdir(KERNELS)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(KERNELS, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"kernels/{name} imports {roots}"


def test_fastmdm_samples_without_triton():
    res = run_python("""
        import sys
        sys.modules["triton"] = None
        import torch, fastmdm as fm, fastmdm.kernels as kernels
        u = fm.sample(lambda u, t: torch.zeros_like(u), fm.cld(), (4, 2), steps=4)
        assert u.shape == (4, 2) and torch.isfinite(u).all()
        assert kernels.NoiseSeed is fm.NoiseSeed and kernels.MAX_K == 8
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_import_fastmdm_kernels_from_the_source_tree():
    """As after a regular ``pip install .``: started in the repository root, fastmdm/ is the
    source tree's and no installed finder maps fastmdm.kernels; it is still ../kernels."""
    res = run_python(f"""
        import os, sys
        sys.meta_path[:] = [f for f in sys.meta_path
                            if not getattr(f, "__module__", "").startswith("__editable__")]
        import fastmdm.kernels
        from fastmdm.kernels import common
        assert "triton" not in sys.modules
        here = os.path.dirname(os.path.abspath(common.__file__))
        assert here == {KERNELS!r}, here
        assert fastmdm.kernels.MAX_K == common.MAX_K
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
