"""Faults the loop must survive (issue 8): a full disk, a damaged checkpoint, kills at random
moments (bench/fault_injection.py, here with a few kills), and row ids that look like paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from conftest import cli_command, cli_env, kill_after_checkpoints, read_metrics, read_weights, sft_args
from rlhf_workflow.cli import main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _metric_rows(run_dir: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _same_metrics(a: Path, b: Path) -> None:
    ours, theirs = _metric_rows(a), _metric_rows(b)
    assert ours.keys() == theirs.keys()
    for key, row in theirs.items():
        for name, value in row.items():
            if isinstance(value, float):
                assert ours[key][name] == pytest.approx(value, abs=1e-4), (key, name)


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KB tmpfs (root only): room for the tiny run's prompts and samples, not all its policies (about 1 MB)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_a_clear_error_and_the_run_resumes(recipe, tmp_path, small_disk, capsys):
    args = [*recipe, "iterations=1", "prompts.per_iteration=8"]
    clean = tmp_path / "clean"
    assert main(["run", *args, f"output_dir={clean}"]) == 0
    capsys.readouterr()
    full = small_disk / "run"
    assert main(["run", *args, f"output_dir={full}"]) == 2
    err = capsys.readouterr().err
    assert "error: no space left on the device" in err and "run the same command again" in err
    assert "Traceback" not in err
    # more room, the same command: it continues and ends where the uninterrupted run did
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    assert main(["run", *args, f"output_dir={full}"]) == 0
    _same_metrics(full, clean)
    for name in ("generations.jsonl", "scored.jsonl", "pairs.jsonl"):
        ids = [json.loads(line)["id"] for line in (full / "iter_1" / name).read_text().splitlines()]
        assert len(ids) == len(set(ids)) == len((clean / "iter_1" / name).read_text().splitlines()), name


def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tiny_model_dir, sft_data, tmp_path):
    steps = 400
    common = sft_args(tiny_model_dir, sft_data, "{out}", f"train.max_steps={steps}", "train.save_every=20",
                      "train.scheduler=cosine", "train.warmup_steps=10", "train.keep_checkpoints=2")
    straight = tmp_path / "straight"
    subprocess.run(cli_command(*[a.format(out=straight) for a in common]), check=True, env=cli_env(),
                   capture_output=True)

    killed = tmp_path / "killed"
    kill_after_checkpoints(cli_command(*[a.format(out=killed) for a in common]), killed, 2)
    older, newest = sorted((killed / "checkpoints").glob("step-*"))[-2:]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # torn by a crash or bit rot

    resumed = subprocess.run(cli_command(*[a.format(out=killed) for a in common], "--resume"), env=cli_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    output = resumed.stdout + resumed.stderr
    assert f"checkpoint {newest} could not be loaded" in output and f"resuming from {older}" in output
    a, b = read_weights(straight / "model"), read_weights(killed / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, steps + 1))


def test_every_checkpoint_damaged_is_a_clear_error(tiny_model_dir, sft_data, tmp_path, capsys):
    out = tmp_path / "out"
    bad = out / "checkpoints" / "step-00000002"
    bad.mkdir(parents=True)
    (bad / "trainer_state.json").write_text('{"step": 2}')
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main([*sft_args(tiny_model_dir, sft_data, str(out), "train.max_steps=4"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "step-00000002" in err and "delete that directory" in err


def test_row_ids_that_look_like_paths_stay_data(recipe, tmp_path):
    """Ids and texts are never used to build paths: ids like '../../x' and '/tmp/x' write nothing
    outside the run directory."""
    marker = f"escape-{uuid.uuid4().hex}"
    rows = [{"id": f"../../{marker}-{i}" if i % 2 else f"/tmp/{marker}-{i}", "prompt": f"Write about {i}."}
            for i in range(8)]
    train = tmp_path / "evil_train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "deep" / "run"
    before = set(tmp_path.rglob("*"))
    args = [a for a in recipe if not a.startswith("prompts.train=")]
    assert main(["run", *args, f"prompts.train={train}", "iterations=1", f"output_dir={run_dir}"]) == 0
    created = {p for p in set(tmp_path.rglob("*")) - before if run_dir not in p.parents and p != run_dir}
    assert created == {tmp_path / "deep"}
    assert not list(Path("/tmp").glob(f"{marker}*")) and not list(tmp_path.parent.glob(f"{marker}*"))
    ids = {json.loads(line)["id"] for line in (run_dir / "iter_1" / "generations.jsonl").read_text().splitlines()}
    assert ids == {r["id"] for r in rows}


def test_fault_injection_script_with_a_few_kills(tmp_path):
    """bench/fault_injection.py (20 kills for the record; 3 here): kills at random moments, then the
    run ends with the same rows, loadable policies and the same metrics as an uninterrupted one."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "fault_injection.py"), "--kills", "3", "--seed", "3",
                             "--work", str(tmp_path / "fi")], capture_output=True, text=True, env=cli_env(), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK: in all" in result.stdout and result.stdout.count("kill ") >= 3


@pytest.mark.parametrize("count, code", [("3", 0), ("0", 2)])
def test_a_worker_of_a_multi_process_run_leaves_its_process_group_and_keeps_its_exit_status(tmp_path, count, code):
    """A process of a launched run tears the process group down and ends without the interpreter's
    teardown (where torch.distributed's threads have aborted finished processes), with its output
    flushed and its exit status kept: 0 after success, 2 after a user error."""
    from conftest import free_port

    out = tmp_path / "prompts.jsonl"
    script = ("import sys, torch.distributed as dist\n"
              "dist.init_process_group('gloo', rank=0, world_size=1)\n"
              "from rlhf_workflow.cli import main\n"
              f"code = main(['prompts', 'task=arithmetic', 'split=train', 'count={count}', 'output={out}'])\n"
              "print('not reached', code)\n")
    env = {**cli_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    assert "not reached" not in result.stdout
    if code == 0:
        assert len(out.read_text().splitlines()) == 3 and str(out) in result.stdout  # the summary line was flushed
    else:
        assert "count" in result.stderr and not out.exists()
