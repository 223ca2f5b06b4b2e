"""End-to-end: train a few steps, predict with three samples and uncertainty maps, evaluate,
report; the test reads the HTML and the overlays, then opens the page in headless Chromium."""

import base64
import io
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_nnunet_dataset, train_flags
from PIL import Image

from medflow.cli import main
from medflow.report.browser import available, headless_chromium

TRAIN = train_flags(steps=3, val_every=3)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = make_nnunet_dataset(root / "ds", n_train=3, n_test=3)
    run, pred, ev = root / "run", root / "pred", root / "eval"
    assert main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 0
    predict = ["predict", "--model", str(run / "checkpoint_final.pt")]
    predict += ["--input", str(data / "imagesTs"), "--out", str(pred)]
    assert main([*predict, "--samples", "3", "--uncertainty", "--quiet", "--threads", "1"]) == 0
    assert (
        main(["evaluate", "--pred", str(pred), "--ref", str(data / "labelsTs"), "--out", str(ev)])
        == 0
    )
    report = ["report", "--pred", str(pred), "--eval", str(ev), "--out", str(root / "r.html")]
    assert main([*report, "--run", str(run), "--png", str(root / "png")]) == 0
    return root, report


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_holds_every_case_and_embedded_figures(reported):
    root, _ = reported
    page = (root / "r.html").read_text()
    table = page.split('<table class="sortable" id="cases">')[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + 3  # header and one row per case
    for case in ("case03", "case04", "case05"):
        assert f">{case}</td>" in table
    # every row has an uncertainty from the entropy map: no dash in the uncertainty column
    assert "&ndash;" not in table
    pictures = _images(page)
    assert len(pictures) == 3 + 1  # best, median, worst; training curves
    for png in pictures:
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from elsewhere
    assert "&quot;samples&quot;: 3" in page and "torch" in page  # prediction.json, versions
    overlays = sorted(p.name for p in (root / "png").iterdir())
    assert overlays == ["case03_overlay.png", "case04_overlay.png", "case05_overlay.png"]


def test_report_refuses_to_overwrite_and_needs_an_output(reported, capsys):
    root, report = reported
    before = (root / "r.html").read_bytes()
    assert main(report) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "r.html: already exists" in err and "--force" in err
    assert (root / "r.html").read_bytes() == before
    assert main(report[:5]) == 2
    assert "pass --out REPORT.html, --png DIR or both" in capsys.readouterr().err
    missing = ["report", "--pred", str(root / "pred"), "--eval", str(root / "nowhere")]
    assert main([*missing, "--out", str(root / "x.html")]) == 2
    assert "summary.json: not found" in capsys.readouterr().err
    assert not (root / "x.html").exists()


@pytest.mark.skipif(
    not available(),
    reason="Debian's chromium and chromium-driver are not installed "
    "(apt-get install chromium chromium-driver; .ci/run does this)",
)
def test_report_renders_in_headless_chromium(reported, tmp_path):
    from selenium.webdriver.common.by import By

    root, _ = reported
    with headless_chromium(1200, 1600) as driver:
        driver.get((root / "r.html").as_uri())
        rows = driver.find_elements(By.CSS_SELECTOR, "#cases tbody tr")
        assert len(rows) == 3
        loaded = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
        )
        assert loaded == [True] * 4
        # a click on the Dice header sorts the rows by Dice, a second click reverses them
        header = driver.find_elements(By.CSS_SELECTOR, "#cases th")[1]
        header.click()
        dice = [
            float(r.find_elements(By.TAG_NAME, "td")[1].text)
            for r in driver.find_elements(By.CSS_SELECTOR, "#cases tbody tr")
        ]
        assert dice == sorted(dice)
        header.click()
        again = [
            float(r.find_elements(By.TAG_NAME, "td")[1].text)
            for r in driver.find_elements(By.CSS_SELECTOR, "#cases tbody tr")
        ]
        assert again == sorted(dice, reverse=True)
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert im.size[0] >= 1000 and len(im.getcolors(1 << 16) or range(1 << 16)) > 50


def test_report_without_maps_shows_no_uncertainty(reported, tmp_path):
    root, _ = reported
    plain = tmp_path / "plain"
    plain.mkdir()
    for case in ("case03", "case04", "case05"):
        shutil.copy(root / "pred" / f"{case}.nii.gz", plain)
    ref = str(root / "ds" / "labelsTs")
    assert main(["evaluate", "--pred", str(plain), "--ref", ref, "--out", str(tmp_path / "e")]) == 0
    out = tmp_path / "plain.html"
    assert (
        main(["report", "--pred", str(plain), "--eval", str(tmp_path / "e"), "--out", str(out)])
        == 0
    )
    page = out.read_text()
    table = page.split('<table class="sortable" id="cases">')[1].split("</table>")[0]
    assert table.count("&ndash;") == 3  # one dash per case in the uncertainty column
    assert len(_images(page)) == 3 and "No prediction.json" in page  # no run: no curves


def test_best_median_worst_picks_each_case_once():
    from medflow.report.cases import CaseRecord, best_median_worst

    def rec(name, d):
        return CaseRecord(name, {}, {"dice": d}, Path(name), Path(name), None)

    picks = best_median_worst([rec("a", 0.5), rec("b", 0.9), rec("c", 0.1), rec("d", 0.7)])
    assert [(role, c.case) for role, c in picks] == [("best", "b"), ("median", "a"), ("worst", "c")]
    assert [c.case for _, c in best_median_worst([rec("a", 0.5), rec("b", 0.9)])] == ["b", "a"]
