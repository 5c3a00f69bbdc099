"""A small run of benchmarks/fuzz_tflite.py in CI: 1,000 mutations of exported flatbuffers through
inspect's reading code and run_tflite, with the C kernels built with AddressSanitizer + UBSan, in a
worker subprocess with a 10 s per-case timeout (and 300 through the reference C kernels). No crash, no hang, no sanitizer report, and no
exception other than MalformedModelError (malformed file) and UnsupportedOp (well-formed file
naming an op, type or option the runner does not implement). The full campaign (20,000 cases) is
in benchmarks/results/fuzz_tflite.json."""

import importlib.util
import os
import shutil

import pytest

from conftest import REPO


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_tflite", os.path.join(REPO, "benchmarks", "fuzz_tflite.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("gcc") is None, reason="the sanitized kernel library needs gcc")
def test_1000_mutations_under_asan_and_ubsan(tmp_path):
    fuzz = _fuzz_module()
    summary = fuzz.campaign(cases=1000, workers=1, timeout=10.0, seed=18, sanitize=True,
                            seeds_dir=str(tmp_path / "seeds"), keep_dir=str(tmp_path / "findings"))
    assert summary["cases"] == 1000
    assert (summary["crashes"], summary["hangs"], summary["sanitizer_reports"]) == (0, 0, 0), summary["findings"]
    assert summary["unexpected_exceptions"] == {"inspect": {}, "run": {}}, summary["samples"]
    # the mutations reach every outcome: refusals, and files that still run through the kernels
    assert summary["run"]["ok"] > 50 and summary["run"]["MalformedModelError"] > 300
    assert summary["inspect"]["ok"] > 200 and summary["inspect"]["MalformedModelError"] > 200
    assert summary["run"].get("UnsupportedOp", 0) > 0
    assert set(summary["mutation_kinds"]) == set(fuzz.KINDS)
    # the reference C kernels (impl='ref') on other mutations
    ref = fuzz.campaign(cases=300, workers=1, timeout=10.0, seed=19, sanitize=True, impl="ref",
                        seeds_dir=str(tmp_path / "seeds"), keep_dir=str(tmp_path / "findings"))
    assert (ref["cases"], ref["crashes"], ref["hangs"], ref["sanitizer_reports"]) == (300, 0, 0, 0), ref["findings"]
    assert ref["unexpected_exceptions"] == {"inspect": {}, "run": {}} and ref["run"]["ok"] > 10
