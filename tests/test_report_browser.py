"""The report of a miniature run opened in a real browser (headless Chromium): every plot decodes,
every table is there, and a screenshot shows a page that is not blank.

Needs Chromium (Debian: `apt-get install chromium`); skipped without it, except where
RLHF_REQUIRE_BROWSER=1 (CI sets it and installs Chromium), where its absence fails."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rlhf_workflow.cli import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# at the page's load event, mark each image with whether the browser decoded it and whether it fits
# the window's width (a plot cut off at the right edge hides its last panel)
PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.setAttribute("data-decoded", img.complete && img.naturalWidth > 0 ? "yes" : "no");
    img.setAttribute("data-fits", img.getBoundingClientRect().right <= document.documentElement.clientWidth ? "yes" : "no");
  }
  document.body.setAttribute("data-probed", String(document.images.length));
});
</script>"""


def chromium() -> str:
    found = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                  if (path := shutil.which(name))), None)
    if found is None:
        if os.environ.get("RLHF_REQUIRE_BROWSER"):
            pytest.fail("RLHF_REQUIRE_BROWSER is set but no Chromium is installed (apt-get install chromium)")
        pytest.skip("needs Chromium (Debian: apt-get install chromium)")
    return found


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args],
                          capture_output=True, text=True, timeout=180)


def test_the_report_opens_in_a_browser_with_every_plot_and_table(recipe, tmp_path):
    browser = chromium()
    run_dir = tmp_path / "run"
    assert main(["run", *recipe, f"output_dir={run_dir}", "iterations=1", "offline.after_online=true"]) == 0
    page = run_dir / "report" / "report.html"
    text = page.read_text(encoding="utf-8")
    plots = len(re.findall(r"<img ", text))
    assert plots >= 7  # the curves, proxy vs gold, pair rewards, gold by length, the paired comparisons

    # the page alone, moved away from its folder: embedded plots need nothing beside it
    probe = tmp_path / "elsewhere" / "report.html"
    probe.parent.mkdir()
    probe.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = headless(browser, tmp_path / "profile", "--window-size=800,1000", "--dump-dom", probe.as_uri()).stdout
    assert f'data-probed="{plots}"' in dom, dom[-2000:]
    assert dom.count('data-decoded="yes"') == plots and 'data-decoded="no"' not in dom
    assert dom.count('data-fits="yes"') == plots
    for heading in ("Held-out evaluation", "Time per stage", "Made by"):
        assert heading in dom
    rows = re.findall(r"<tr>(.*?)</tr>", dom, flags=re.S)
    for policy in ("iter_0", "iter_1", "offline"):
        assert any(f"<td>{policy}</td>" in row for row in rows), policy

    # what a person sees: a screenshot that is a page, not a blank or an error
    shot = tmp_path / "report.png"
    headless(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1200) and pixels.std() > 0.05
