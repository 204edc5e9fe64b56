"""How `siglip bench` shows a `Report` on the terminal: a line naming what was measured where, the table of
measurements by stage, and siglip's ratio to each reference."""

from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .benchmark import Report

NARROW_BELOW = 76  # narrower terminals get the table without its peak MB and setup s columns
TIGHT_BELOW = 48  # and narrower still, its columns closer together, its labels folded to what the numbers leave


def report(result: Report, *, width: int) -> RenderableType:
    """The whole report as one rich renderable, for a console `width` characters wide. The heading is a line of its
    own, not the table's title: rich would wrap that to the table's width."""
    ratios = [Text(f"siglip / {name} at batch {size}: {ratio:.2f}×") for size, name, ratio in result.ratios()]
    return Group(Text(heading(result), style="italic"), stage_table(result, width=width), *ratios)


def heading(report: Report) -> str:
    """What was measured where: model, device, torch, dtype and the weights' size."""
    m = report.machine
    weights = f"{report.weights_mb:,.0f}" if report.weights_mb >= 10 else f"{report.weights_mb:#.3g}"  # 0.123, 5.30
    return f"{report.model} · {m.device} · torch {m.torch_version} · {m.dtype} · weights {weights} MB"


def stage_table(report: Report, *, width: int = 200) -> Table:
    """One row per measurement, grouped by stage, for a console `width` columns wide: the words wrap, the numbers
    never. Below `NARROW_BELOW` columns peak MB and setup s are left out (the caption says where they are)."""
    narrow, tight = width < NARROW_BELOW, width < TIGHT_BELOW
    # The box's edges are a space each side, and its columns are three apart: where they were short of room, the
    # last column was cut for them (at 40 columns, the cosines).
    table = Table(
        header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=not narrow, padding=(0, 0 if tight else 1)
    )
    table.add_column("backend, variant", overflow="fold", min_width=4 if tight else 12)
    memory_columns = () if narrow else ("peak MB", "setup s")
    for column in ("batch", "img/s", "ms/img", *memory_columns, "cosine"):
        table.add_column(column, justify="right", no_wrap=True)
    if narrow:
        table.caption, table.caption_justify = "peak MB and setup s in a wider terminal or with --json", "left"
    stage = None
    for r in report.results:
        if r.stage != stage:  # each stage under a heading of its own, not in a column every row pays for
            if stage is not None:
                table.add_section()
            stage = r.stage
            table.add_row(STAGE_HEADINGS.get(stage, stage), style="bold")
        # "timm+float16", not "timm timm+float16": timm's variant is its name and what was applied
        label = r.variant if r.variant.split("+")[0] == r.backend else f"{r.backend} {r.variant}"
        peak, setup = r.peak_mem_mb, r.setup_s
        memory = ["" if peak is None else f"{peak:,.0f}", "" if setup is None else f"{setup:.1f}"]
        table.add_row(
            label, str(r.batch_size), rate_text(r.images_per_s), rate_text(r.ms_per_image), *([] if narrow else memory),
            "" if r.cosine is None else f"{r.cosine:.6f}",
        )  # fmt: skip
    return table


STAGE_HEADINGS = {
    "model": "model only",
    "decode": "decode (one core)",
    "preprocess": "decode + preprocess (one core)",
    "end_to_end": "end to end (files → embeddings)",
}


def rate_text(value: float) -> str:
    """Three significant digits or more, no wider than that needs: 13,887 · 426 · 2.35 · 0.150 · 0.0712."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value >= 1 else f"{value:#.3g}"
