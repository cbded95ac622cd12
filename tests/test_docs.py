"""The documentation: the site builds in strict mode (a broken link, a missing page or an anchor that
is not there fails), its generated references match the code, every config key says what it means,
and the README stays a short front door whose links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_site_builds_in_strict_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index.html", "quickstart/index.html", "reference/config/index.html", "reference/cli/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    config_page = (tmp_path / "site" / "reference/config/index.html").read_text(encoding="utf-8")
    assert "generation.sampling.max_new_tokens" in config_page and "dpo.train.lr" in config_page


def test_generated_references_match_the_code():
    result = subprocess.run([sys.executable, "scripts/docs_reference.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_config_key_says_what_it_means():
    from rlhf_workflow.config import COMMAND_CONFIGS, config_reference

    silent = [f"{command}: {key.key}" for command, model in COMMAND_CONFIGS.items()
              for key in config_reference(model) if not key.description.strip()]
    assert not silent, silent


def test_config_reference_lists_nested_keys_with_their_defaults():
    from rlhf_workflow.config import GenerateConfig, RunConfig, config_reference

    keys = {key.key: key for key in config_reference(RunConfig)}
    assert keys["dpo.train.lr"].default == 5e-7  # the run recipe's own default, not the stage's
    assert keys["generation.sampling.n"].type == "int" and keys["generation.sampling.n"].default == 4
    assert keys["feedback.rm.model"].type == "section | None"  # an optional section
    assert "policy.lora.r" in keys and keys["policy"].type == "section"
    generate = {key.key: key for key in config_reference(GenerateConfig)}
    assert generate["prompts"].required and generate["output"].required
    assert generate["backend"].type == "'hf' | 'vllm' | 'openai'"


def test_readme_is_a_short_front_door_whose_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert "bash scripts/install.sh && .venv/bin/rlhf-workflow demo" in text
    assert "bash scripts/install.sh && .venv/bin/python -m pytest" in text
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links
    missing = [link for link in links if not link.startswith("http") and not (ROOT / link).exists()]
    assert not missing, missing

