"""Optional dependencies make tests skip where they are absent and fail under
D2V_REQUIRE_OPTIONAL=1 (CI). Each check runs pytest in a subprocess whose launcher hides modules
(sys.modules[name] = None: import raises ModuleNotFoundError and find_spec answers None, as for a
missing package)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

IN_TEST = '''
import pytest

def test_needs_the_hidden_module_inside_the_test():
    pytest.importorskip("tokenizers")

def test_other_skips_stay_skips():
    pytest.skip("needs CUDA")

def test_plain():
    assert True
'''
MODULE_LEVEL = '''
import pytest
pytest.importorskip("tokenizers")

def test_never_runs():
    pass
'''


def _pytest(args, hide, require, cwd):
    launcher = (f"import sys\nfor m in {hide!r}: sys.modules[m] = None\n"
                "import pytest\nsys.exit(pytest.main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "D2V_REQUIRE_OPTIONAL": "1" if require else "0"}
    done = subprocess.run([sys.executable, "-c", launcher, "-q", "-rs", "-p", "no:cacheprovider",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def _tmp_suite(tmp_path):
    shutil.copyfile(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_in_test.py").write_text(IN_TEST)
    (tmp_path / "test_module_level.py").write_text(MODULE_LEVEL)
    return tmp_path


def test_missing_optional_dependency_skips_with_its_reason(tmp_path):
    rc, out = _pytest([], ["tokenizers"], False, _tmp_suite(tmp_path))
    assert rc == 0, out
    assert "1 passed, 3 skipped" in out, out
    assert out.count("could not import 'tokenizers'") == 2, out
    assert "needs CUDA" in out and "D2V_REQUIRE_OPTIONAL" not in out, out


def test_missing_optional_dependency_fails_under_require_optional(tmp_path):
    # A failed collection stops the session; go on to show the in-test case fails too.
    rc, out = _pytest(["--continue-on-collection-errors"], ["tokenizers"], True,
                      _tmp_suite(tmp_path))
    assert rc != 0, out
    assert out.count("D2V_REQUIRE_OPTIONAL=1: an optional dependency is missing") == 2, out
    assert "needs CUDA" in out, out  # a skip for another reason is still a skip


def test_present_optional_dependency_runs_under_require_optional(tmp_path):
    rc, out = _pytest([], [], True, _tmp_suite(tmp_path))
    assert rc == 0 and "3 passed, 1 skipped" in out, out


def test_our_modules_needing_optional_packages_skip_without_them():
    hidden = ["nvidia.dali", "transformers", "tokenizers"]
    modules = ["tests/test_dali.py", "tests/test_tokenize.py", "tests/test_export.py",
               "tests/test_init_from.py"]
    rc, out = _pytest(["--collect-only", *modules], hidden, False, ROOT)
    assert rc in (0, 5), out  # 5: everything skipped, nothing collected
    assert "error" not in out.lower() and out.count("could not import") == len(modules), out
