"""``medflow report``: one self-contained HTML page for a prediction/evaluation folder.

Everything is inside the file (PNG figures as base64 ``data:`` URIs, a few lines of inline CSS
and JavaScript, no CDN), so the page opens offline and can be mailed as one attachment:

* the class means of ``summary.json``;
* a per-case table (foreground-mean Dice, IoU, HD95, ASSD, uncertainty, Dice per class) that
  sorts on a click on any header;
* overlays of image, reference, prediction and entropy for the best, median and worst case;
* training curves and ``config.json`` when a run folder is given;
* ``prediction.json`` (checkpoint and sampling options) and the library versions.
"""

from __future__ import annotations

import base64
import html
import json
import platform
import tempfile
from importlib import metadata
from pathlib import Path

from medflow.data.io import atomic_write
from medflow.errors import DataError, OutputExistsError
from medflow.report.cases import CaseRecord, ReportData, best_median_worst, collect
from medflow.report.overlay import overlay_png

LIBRARIES = ("medflow", "torch", "numpy", "monai", "nibabel", "scipy", "matplotlib", "pillow")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 72em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
"""

# sort by a cell's data-value (numbers) or its text; a second click reverses the order
_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col];
        var u = parseFloat(x.dataset.value), v = parseFloat(y.dataset.value);
        var c = (isNaN(u) || isNaN(v)) ? x.textContent.localeCompare(y.textContent)
                                       : u - v;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _cell(value: float | None, digits: int) -> str:
    if value is None:
        return '<td data-value="">&ndash;</td>'
    return f'<td data-value="{value!r}">{value:.{digits}f}</td>'


def _summary_table(summary: dict) -> str:
    rows = [(name, m) for name, m in summary["mean"].items()]
    rows.append(("foreground mean", summary["foreground_mean"]))
    body = "".join(
        f"<tr><td>{_e(name)}</td>{_cell(m['dice'], 4)}{_cell(m['iou'], 4)}"
        f"{_cell(m['hd95'], 2)}{_cell(m['assd'], 2)}</tr>"
        for name, m in rows
    )
    head = "<tr><th>class</th><th>Dice</th><th>IoU</th><th>HD95 mm</th><th>ASSD mm</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{body}</tbody></table>"


def _case_table(cases: list[CaseRecord], classes: list[str]) -> str:
    head = "".join(
        f"<th>{_e(h)}</th>"
        for h in (
            "case",
            "Dice",
            "IoU",
            "HD95 mm",
            "ASSD mm",
            "uncertainty",
            *(f"Dice {c}" for c in classes),
        )
    )
    rows = []
    for c in cases:
        cells = [
            f'<td data-value="{_e(c.case)}">{_e(c.case)}</td>',
            _cell(c.mean["dice"], 4),
            _cell(c.mean["iou"], 4),
            _cell(c.mean["hd95"], 2),
            _cell(c.mean["assd"], 2),
            _cell(c.uncertainty, 4),
            *(_cell(c.metrics[name]["dice"], 4) for name in classes),
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<table class="sortable" id="cases"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _curves(run: Path) -> bytes | None:
    from medflow.report.curves import plot_training_curves

    log = run / "log.csv"
    if not log.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return plot_training_curves(log, Path(tmp) / "curves.png").read_bytes()


def _json_block(title: str, data: dict) -> str:
    return f"<h3>{_e(title)}</h3><pre>{_e(json.dumps(data, indent=2))}</pre>"


def render(data: ReportData, run: Path | None = None, title: str = "medflow report") -> str:
    """The report page as one HTML string."""
    summary = data.summary
    classes = list(summary["mean"])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>{summary['n_cases']} cases. Metrics at native resolution; "
        f"empty-mask policy: {_e(summary.get('policy', ''))}.</p>",
        "<h2>Class means</h2>",
        _summary_table(summary),
        "<h2>Cases</h2>",
        '<p class="note">Click a column header to sort. Dice, IoU, HD95 and ASSD are means '
        "over the foreground classes of the case. Uncertainty: summed predictive entropy "
        "(nats) per predicted foreground voxel; &ndash; where the prediction has no entropy "
        "map (predict without --uncertainty).</p>",
        _case_table(data.cases, classes),
        "<h2>Best, median and worst case</h2>",
    ]
    for role, case in best_median_worst(data.cases):
        unc = "" if case.uncertainty is None else f", uncertainty {case.uncertainty:.4f}"
        caption = f"{role}: {case.case}, Dice {case.mean['dice']:.4f}{unc}"
        png = overlay_png(case, data.num_classes, f"{role}: {case.case}")
        parts.append(
            f'<figure class="overlay">{_img(png, caption)}<figcaption>{_e(caption)}'
            "</figcaption></figure>"
        )
    if run is not None:
        parts.append("<h2>Training</h2>")
        curves = _curves(run)
        if curves is not None:
            parts.append(f"<figure>{_img(curves, 'training curves')}</figure>")
        config = run / "config.json"
        if config.is_file():
            try:
                parts.append(_json_block("config.json", json.loads(config.read_text())))
            except ValueError as exc:
                raise DataError(config, f"cannot be read as JSON: {str(exc)[:200]}") from exc
    parts.append("<h2>Prediction and software</h2>")
    if data.prediction:
        parts.append(_json_block("prediction.json", data.prediction))
    else:
        parts.append('<p class="note">No prediction.json (written by predict --uncertainty).</p>')
    parts.append(_json_block("library versions", _versions()))
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    pred_dir: str | Path,
    eval_dir: str | Path,
    out: str | Path,
    *,
    images: str | Path | None = None,
    run: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Write the report of ``pred_dir`` and ``eval_dir`` (``summary.json``) to ``out``.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is False.
        DataError: a folder or file the report needs is missing or unreadable.
    """
    out = Path(out)
    if out.is_dir():
        raise DataError(out, "is a folder; expected an HTML file name")
    if out.exists() and not force:
        raise OutputExistsError(out)
    if run is not None and not Path(run).is_dir():
        raise DataError(run, "run folder not found")
    data = collect(pred_dir, eval_dir, images)
    page = render(data, Path(run) if run is not None else None)
    if not out.parent.exists():
        raise DataError(out.parent, "folder not found; create it first")
    atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out
