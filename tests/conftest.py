"""Test-session set-up.

Triton decides at import time whether it interprets kernels, so TRITON_INTERPRET=1 is set here,
before any test module imports triton, and only where no CUDA device exists: there every Triton
kernel runs (interpreted) on CPU tensors in the whole suite, the end-to-end runs included. Where
CUDA exists the kernels stay compiled: tests/test_cuda_kernels.py runs them on CUDA tensors, and the
tests that need the interpreter (CPU tensors through the Triton path) are skipped with that reason.

Optional dependencies (DALI, transformers, tokenizers, accelerate, soundfile): a test that needs
one calls pytest.importorskip, so where it is not installed the test is skipped with the import
error as its reason. CI installs them all and sets D2V_REQUIRE_OPTIONAL=1, which turns every such
skip into a failure: CI never silently runs fewer tests. Other skips ("needs CUDA") stay skips.

The marker `latest` picks the tests `make test-latest` runs on the newest releases (each
integration once: scripts/latest.py lists them). There D2V_EXPECT_INSTALLED=1 says the engine must
come from an installed wheel, not this checkout; the session stops at once if it does not.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

REQUIRE_OPTIONAL = os.environ.get("D2V_REQUIRE_OPTIONAL") == "1"
CHECKOUT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "latest: run by make test-latest on the newest releases")
    config.addinivalue_line("markers", "fp32_attention: fp32 attention kernels on CUDA, whose "
                            "compiles take most of the GPU test time; make gpu-check runs them "
                            "only with --fp32")


def pytest_sessionstart(session):
    if os.environ.get("D2V_EXPECT_INSTALLED") != "1":
        return
    import d2v_engine
    import d2v_kernels

    for package in (d2v_engine, d2v_kernels):
        where = Path(package.__file__).resolve()
        if where.is_relative_to(CHECKOUT / package.__name__):
            pytest.exit(f"D2V_EXPECT_INSTALLED=1, but {package.__name__} is imported from the "
                        f"checkout ({where}), not an installed wheel", returncode=3)
_IMPORTORSKIP_REASONS = ("could not import ", "module '")  # pytest.importorskip's two messages


def _missing_dependency(report) -> str | None:
    """The importorskip reason of a skipped report, or None for any other outcome."""
    if not (report.skipped and isinstance(report.longrepr, tuple)):
        return None
    reason = report.longrepr[2].removeprefix("Skipped: ")
    return reason if reason.startswith(_IMPORTORSKIP_REASONS) else None


def _fail_if_required(report) -> None:
    reason = _missing_dependency(report) if REQUIRE_OPTIONAL else None
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = (f"D2V_REQUIRE_OPTIONAL=1: an optional dependency is missing, so this "
                           f"would be skipped: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_required(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_required(outcome.get_result())
