"""The quick start as written: every command of docs/quickstart.md's shell blocks runs here, in a
directory with the shipped `configs/` and `examples/`, shrunk to the tiny model (the only change: a
`model.name_or_path` / `policy.name_or_path` override), or is listed with the reason it does not run.
The README's own-data commands are the quick start's."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from rlhf_workflow.cli import main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# The override that puts each command on the tiny model, by its command word.
MINIATURE = {"train-rm": ["model.name_or_path={tiny}"], "sft": ["model.name_or_path={tiny}"],
             "run": ["policy.name_or_path={tiny}"], "eval-rm": [], "report": [], "compare": []}
# Commands of the quick start this test does not run, and why.
NOT_RUN = {
    "bash scripts/install.sh && .venv/bin/rlhf-workflow demo": "the setup is what CI runs first; the demo's recipe "
    "runs in miniature in tests/test_demo.py",
    "bash scripts/install.sh && .venv/bin/python -m pytest": "the test command itself, which CI runs",
}


def shell_lines(page: Path) -> list[str]:
    """The commands of a page's bash blocks, comments and continuation lines joined."""
    text = page.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_the_readme_gives_the_quick_starts_own_data_commands():
    quick = shell_lines(ROOT / "docs" / "quickstart.md")
    readme = [line for line in shell_lines(ROOT / "README.md") if line.startswith("rlhf-workflow ")
              and "configs/paper-llama3-8b.yaml" not in line]
    assert readme and all(line in quick for line in readme), (readme, quick)


def test_every_quick_start_command_runs_as_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import shutil

    for name in ("configs", "examples"):  # copies: nothing a command writes lands in the repository
        shutil.copytree(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in shell_lines(ROOT / "docs" / "quickstart.md"):
        if line in NOT_RUN:
            continue
        words = shlex.split(line)
        assert words[0] == "rlhf-workflow" and words[1] in MINIATURE, f"{line!r}: run it here or say why in NOT_RUN"
        extra = [word.format(tiny=tiny_model_dir) for word in MINIATURE[words[1]]]
        capsys.readouterr()
        assert main(words[1:] + extra) == 0, (line, capsys.readouterr().err)
        ran.append(words[1])
    assert ran[:5] == ["train-rm", "eval-rm", "run", "report", "compare"]  # the own-data route, in its order
    assert (tmp_path / "runs" / "my-rm" / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "runs" / "my-rm" / "eval.json").read_text())["accuracy"] >= 0
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "own-data" / "metrics.jsonl").read_text().splitlines()]
    assert [row["id"] for row in metrics] == ["iter_0", "iter_1"]  # π0 and the one iteration, evaluated
    assert all("proxy_reward" in row for row in metrics)
    report = (tmp_path / "runs" / "own-data" / "report" / "report.md").read_text()
    assert "No gold function is set (eval.gold_function)" in report  # why the gold column is empty
    # the tiny random model rarely ends its turn: the report says its answers are cut
    assert "of its answers hit eval.sampling.max_new_tokens (32) before ending their turn" in report
    assert "no gold function set (eval.gold_function)" in (tmp_path / "comparison" / "compare.md").read_text()
    assert (tmp_path / "runs" / "own-data" / "report" / "report.html").is_file()
    assert (tmp_path / "comparison" / "compare.md").is_file()
    assert "sft" in ran and (tmp_path / "runs" / "quickstart-sft" / "model").is_dir()
