"""The per-run HTML report: ``<run dir>/report/index.html`` with the metrics table, the run's figures
and the model card, in one self-contained file (figures inlined as base64 PNG, no script, no CDN), so
it opens from a laptop, a cluster's file browser or a CI artifact alike.

The table has the columns of ``evaluation.format_table`` (known metrics first, in the same order); the
card (``model/card.md``) is rendered with markdown-it-py (already installed with rich) rather than a
hand-written converter.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Iterable

from markdown_it import MarkdownIt

from zoo import metrics as M

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #111; max-width: 1150px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #999; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #e8e8e8; }
caption { text-align: left; font-size: 12px; color: #333; padding-bottom: 4px; }
.scroll { overflow-x: auto; }
figure { margin: 12px 0; } figcaption { font-size: 12px; color: #333; }
img { max-width: 100%; border: 1px solid #ddd; }
pre, code { background: #f4f4f4; font-size: 12px; } pre { padding: 8px; overflow-x: auto; }
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def metrics_table(rows: dict[str, dict[str, float]], split: str = "test split") -> str:
    """The ``rows`` dict train() builds as an HTML table (one row per model / method)."""
    columns = table_columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr><td>" + html.escape(name) + "</td>"
                   + "".join(f"<td>{_cell(row[c]) if c in row else '-'}</td>" for c in columns) + "</tr>"
                   for name, row in rows.items())
    return (f'<div class="scroll"><table id="metrics"><caption>{html.escape(split)}</caption><thead><tr>'
            f"<th>model / method</th>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def run_figures(run_dir: Path) -> list[Path]:
    """The figures worth reading from a run: every test-time figure and the last of each other series
    (``val-epoch004.png``, ``prototype-gallery-epoch009.png`` … keep their latest epoch only)."""
    found = sorted(p for p in (run_dir / "figures").rglob("*.png")) if (run_dir / "figures").is_dir() else []
    latest: dict[str, Path] = {}
    for path in found:  # sorted, so a later epoch replaces an earlier one of the same series
        series = re.sub(r"epoch\d+", "", path.stem)
        latest[series if not path.stem.startswith("test") else path.stem] = path
    return sorted(latest.values(), key=lambda p: (not p.stem.startswith("test"), p.name))


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'


def write_report(run_dir: str | Path, rows: dict[str, dict[str, float]], title: str,
                 figures: Iterable[Path] | None = None, card: str | None = None,
                 split: str = "test split") -> Path:
    """Write ``<run_dir>/report/index.html``. ``figures`` default to :func:`run_figures`, ``card`` to the
    text of ``<run_dir>/model/card.md`` when present. Returns the path of the page."""
    run_dir = Path(run_dir)
    figures = run_figures(run_dir) if figures is None else list(figures)
    if card is None:
        card_file = run_dir / "model" / "card.md"
        card = card_file.read_text() if card_file.is_file() else None
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Metrics</h2>", metrics_table(rows, split),
             "<h2>Figures</h2>", "".join(_figure(p) for p in figures) or "<p>no figures in this run</p>"]
    if card:
        # html=False: the card is data, its raw HTML (if any) is shown as text, never executed.
        parts += ["<h2>Model card</h2>", MarkdownIt("commonmark", {"html": False}).enable("table").render(card)]
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    out = run_dir / "report" / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def table_columns(rows: dict[str, dict[str, float]]) -> list[str]:
    """The table's columns (text table and HTML report): known ones first, in _ORDER; the rest in the
    order rows first use them (a set would order them by string hash, which differs between runs)."""
    return sorted(dict.fromkeys(c for r in rows.values() for c in r), key=lambda c: _ORDER.get(c, len(_ORDER)))


_ORDER = {c: i for i, c in enumerate(
    ["acc", "auroc", "hit_rate", "energy_in_mask", "deletion_auc", "insertion_auc", "stability", "map_iou",
     *(f"{m}_auc[{s}]" for m in ("deletion", "insertion") for s in M.SUBSTRATES)])}
