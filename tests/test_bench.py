"""The benchmarks still run against today's code (they call into the model directly, so a refactor can break them
without any other test noticing), and the variants each one compares agree (coarsely where weights are random)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script, *args) -> str:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_gpu_step_runs_on_a_cpu_and_its_two_kinds_agree():
    """A coarse agreement only: with random weights the attention is nearly uniform, so the loss and gradients
    hardly see the template's details (tests/test_adapter.py checks the function itself, in float64)."""
    out = run("gpu_step.py", "--device", "cpu", "--layers", "3", "--batch", "1", "--repeats", "1", "--threads", "1",
              "--models", "demo", "--prompt-tokens", "30", "--response-tokens", "5")
    rows = {kind: line.split() for line in out.splitlines() for kind in ("ours", "template")
            if re.search(rf"\b{kind}\b", line)}
    assert set(rows) == {"ours", "template"}
    assert float(rows["ours"][-2]) == pytest.approx(float(rows["template"][-2]), rel=1e-3)  # the losses
    assert float(rows["ours"][-1]) == 0 and float(rows["template"][-1]) < 2e-2  # the adapters' gradients vs ours


@pytest.mark.slow
def test_wl_attention_small_fast_path_agrees_with_the_literal_template():
    out = run("wl_attention.py", "--small", "--iters", "1", "--threads", "1")
    agreements = re.findall(r"relative difference of sums ([0-9.e+-]+), of gradient norms ([0-9.e+-]+)", out)
    assert len(agreements) == 2  # the branch alone, the whole layer
    assert all(float(a) < 1e-5 and float(g) < 1e-4 for a, g in agreements)
