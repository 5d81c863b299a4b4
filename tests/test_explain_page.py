"""The explain page in headless Chromium: it opens from file:// with nothing fetched, switching layer and head
changes what is shown, hovering a cell names the two tokens and their weight, and a long input says it was cut."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers_explain import fake_report
from llmkit.explain.page import write_page


def open_page(page, path: Path) -> list[str]:
    """Load the page; returns the list of every URL it requested (filled as it runs)."""
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    assert errors == []
    return requests


def hover_cell(page, i: int, j: int, n_tokens: int) -> str:
    """Hover attention cell (query i, key j) of the canvas and return the info line."""
    page.locator("#attention").scroll_into_view_if_needed()
    box = page.locator("#attention").bounding_box()
    side = box["width"] / n_tokens
    page.mouse.move(box["x"] + (j + 0.5) * side, box["y"] + (i + 0.5) * side)
    return page.locator("#hover-info").inner_text()


@pytest.mark.browser
def test_page_switches_layer_and_head_and_hovers(browser_page, tmp_path):
    report = fake_report(n_tokens=7, n_layer=3, n_head=4)
    arrays = report.pop("_arrays")
    att = np.stack(arrays["attentions"])  # (L, H, T, T)
    path = write_page(report, arrays, tmp_path / "index.html")
    page = browser_page
    requests = open_page(page, path)

    assert page.locator("#layer option").count() == 3 and page.locator("#head option").count() == 4
    first = hover_cell(page, 5, 2, 7)
    assert f"{att[0, 0, 5, 2]:.4f}" in first and "[5]" in first and "[2]" in first
    assert report["tokens"][5].strip() in first
    stats_before = page.locator("#head-stats").inner_text()

    page.select_option("#layer", "1")
    page.select_option("#head", "3")
    second = hover_cell(page, 5, 2, 7)
    assert second != first
    assert "layer 1 head 3" in second and f"{att[1, 3, 5, 2]:.4f}" in second
    summary = next(h for h in report["attention"]["heads"] if h["layer"] == 1 and h["head"] == 3)
    stats_after = page.locator("#head-stats").inner_text()
    assert stats_after != stats_before and f"{summary['entropy']:.4f}" in stats_after

    # a causal model puts no weight above the diagonal: the page shows the exact zero, not a neighbour's value
    assert "= 0.0000" in hover_cell(page, 1, 4, 7)

    page.select_option("#view", "rollout")
    assert f"{arrays['rollout'][6, 0]:.4f}" in hover_cell(page, 6, 0, 7)

    cell = report["logit_lens"][2][3]
    page.locator('#lens td.cell[data-layer="2"][data-pos="3"]').hover()
    info = page.locator("#hover-info").inner_text()
    assert "lens layer 2" in info and cell["token"].strip() in info and f"{cell['prob']:.4f}" in info

    page.locator('.tok[data-i="4"]').hover()
    info = page.locator("#hover-info").inner_text()
    assert f"IG {report['attributions']['integrated_gradients'][4]:.4f}" in info
    assert page.locator("#attributions tbody tr").count() == 7
    assert page.locator("#lens tbody tr").count() == 4  # embeddings + 3 layers
    assert page.locator("#truncated").is_hidden() and page.locator("#lens-controls").is_hidden()

    page.screenshot(path=str(tmp_path / "explain_page.png"), full_page=True)
    assert (tmp_path / "explain_page.png").stat().st_size > 10_000
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


@pytest.mark.browser
def test_page_opens_on_focus_and_says_when_attention_was_cut(browser_page, tmp_path):
    report = fake_report(n_tokens=60, n_layer=2, n_head=2, max_attention_tokens=50)
    report["focus"] = {"layer": 1, "head": 1}
    arrays = report.pop("_arrays")
    path = write_page(report, arrays, tmp_path / "index.html")
    html = path.read_text()
    assert "attention_f32\": null" in html  # over the cap: the matrices stay out of the page
    page = browser_page
    open_page(page, path)
    assert page.locator("#layer").input_value() == "1" and page.locator("#head").input_value() == "1"
    notice = page.locator("#truncated")
    assert notice.is_visible() and "60 tokens" in notice.inner_text() and "50" in notice.inner_text()
    summary = next(h for h in report["attention"]["heads"] if h["layer"] == 1 and h["head"] == 1)
    assert f"{summary['mean_distance']:.4f}" in page.locator("#head-stats").inner_text()
    # 60 positions > the lens window of 40: the table starts at the end, where the target is predicted
    assert page.locator("#lens-controls").is_visible()
    assert page.locator("#lens thead th").count() == 41
    # rollout (T x T) still fits: it comes from `_arrays`, so the matrix view shows it
    assert page.locator("#view").input_value() == "rollout" and page.locator("#layer").is_disabled()
    assert f"{arrays['rollout'][59, 3]:.4f}" in hover_cell(page, 59, 3, 60)


def test_page_data_is_inert_inside_the_script_tag(tmp_path):
    """A token such as "</script>" must not end the data element: the page escapes <, > and & as JSON escapes."""
    report = fake_report(n_tokens=4)
    report["tokens"][1] = "</script><b>x</b>&amp;"
    arrays = report.pop("_arrays")
    html = write_page(report, arrays, tmp_path / "index.html").read_text()
    data = html.split('id="report-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(data)["tokens"][1] == "</script><b>x</b>&amp;"


@pytest.mark.browser
@pytest.mark.slow
def test_page_of_a_real_run_shows_the_reports_numbers(browser_page, tmp_path, corpus_file):
    """`llmkit explain` on a tiny Llama: the page's hover values are report.json's, for another layer and head too."""
    from helpers_convert import chat_tokenizer, make_run_folder
    from llmkit.cli.main import main

    run = make_run_folder(tmp_path / "run", "llama", chat_tokenizer(corpus_file.read_text()[:30_000]))
    out = tmp_path / "ex"
    assert main(["explain", "--model", str(run), "--text", "Now is the winter of our discontent", "--out", str(out),
                 "--methods", "attention,logit-lens,saliency"]) == 0
    report = json.loads((out / "report.json").read_text())
    att, t = report["attention"]["layers"], len(report["tokens"])
    page = browser_page
    open_page(page, out / "index.html")
    assert f"{att[0][0][t - 1][1]:.4f}" in hover_cell(page, t - 1, 1, t)
    page.select_option("#layer", "1")
    page.select_option("#head", "3")
    assert f"{att[1][3][t - 1][1]:.4f}" in hover_cell(page, t - 1, 1, t)
    assert page.locator("#view option").count() == 1  # no rollout was asked for
    assert "integrated-gradients not run" not in page.locator("#attributions").inner_text()
    assert page.locator("#lens tbody tr").count() == report["n_layer"] + 1
    page.screenshot(path=str(tmp_path / "explain_real_run.png"), full_page=True)


def test_page_leaves_out_attention_too_big_for_one_page(monkeypatch):
    import llmkit.explain.page as page_mod

    report = fake_report(n_tokens=8, n_layer=2, n_head=2)  # 2 x 2 x 8 x 8 = 256 weights
    arrays = report.pop("_arrays")
    assert page_mod.page_data(report, arrays)["attention_f32"] is not None
    monkeypatch.setattr(page_mod, "PAGE_MAX_WEIGHTS", 100)
    data = page_mod.page_data(report, arrays)
    assert data["attention_f32"] is None and data["attention"]["page_cut"] is True
    assert data["rollout_f32"] is not None  # 64 values
    assert "layers" not in data["attention"] and data["attention"]["heads"] == report["attention"]["heads"]
