"""The prepared GPU check's reduced mode on the CPU: every numerics check runs and passes, and the
training and generation benchmarks it drives write their figures."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import cli_env

from rlhf_workflow.processes import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_reduced_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--cpu"], env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["ok"] and summary["mode"] == "cpu"
    assert set(summary["layouts"]) == {"padded", "shared", "packed", "shared+packed"}
    assert all(c["ok"] and c["logp_rel"] < 2e-2 for c in summary["layouts"].values())
    assert summary["end_of_turn"]["end_of_turn_certain"]["finish_reasons"] == ["stop"]
    assert summary["end_of_turn"]["other_token_certain"]["finish_reasons"] == ["length"]
    assert {"dpo_ours", "rm_ours"} <= set(summary["step1"]) and all(c["ok"] for c in summary["step1"].values())
    # a CPU without bf16 instructions emulates bf16 matmuls (about 1 GFLOP/s for the 1024² matrices
    # of the peak measurement, more for the tiny model's): its "peak" bounds nothing there
    bounded = cpu_has_native_bf16()
    for bench in ("dpo_vs_trl", "rm_vs_trl"):
        ours = summary[bench]["best"]["ours"]
        assert ours["tokens_per_s"] > 0 and summary[bench]["options"]["precision"] == "bf16"
        assert 0 < ours["of_peak"] < (1 if bounded else float("inf"))
        # the peak is the trainer's own, measured in its process just before and just after its run
        assert ours["peak_flops"] == max(ours["peak_flops_before_after"]) > 0
        assert ours["of_peak"] == pytest.approx(ours["flops"] / ours["seconds"] / ours["peak_flops"])
    assert summary["generate"]["best"]["ours"]["tokens"] > 0
    page = (out / "gpu_check.md").read_text()
    assert "## Numerics (bf16)" in page and "| DPO | ours |" in page and "| generation | hf backend |" in page
