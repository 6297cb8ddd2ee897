"""Every benchmark script still imports what it uses: a renamed function in machex or
cheff must not leave a benchmark that fails only when someone next measures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SCRIPTS = sorted(
    path.name for path in BENCHMARKS.glob("*.py") if '__name__ == "__main__"' in path.read_text()
)


def test_the_scripts_are_found() -> None:
    assert {"bench_build.py", "bench_codecs.py", "gpu_suite.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
