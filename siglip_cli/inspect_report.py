"""How `siglip inspect` shows an `Inspection` on the terminal: a few header lines, the stage table, the parameters."""

from __future__ import annotations

import math
import re

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .tracing import Inspection, Stage, layer_of, preprocessing_steps


NOTES_MIN_WIDTH = 150  # narrower terminals get the stage table without its "what it is" column
COMPACT_BELOW = 100  # narrower ones get shapes as 1×196×768, the dtype only where it is not float32, 3 digits
NARROW_BELOW = 78  # and narrower still, mean and std only: four numbers and a long stage name need 77 columns
STATISTICS = ("mean", "std", "min", "max")


def report(result: Inspection, *, width: int) -> RenderableType:
    """The whole report as one rich renderable, for a console `width` characters wide."""
    table = stage_table(
        result, notes=width >= NOTES_MIN_WIDTH, compact=width < COMPACT_BELOW,
        statistics=STATISTICS[:2] if width < NARROW_BELOW else STATISTICS,
    )  # fmt: skip
    return Group(*header(result), Text(), table, Text(), parameter_table(result), Text(), cost(result))


def header(result: Inspection) -> list[Text]:
    cfg, pre = result.config, result.preprocessing
    traced = f" on {result.image}" if result.image else ""
    lines = [Text.assemble(("siglip inspect: ", "bold"), (result.model, "bold cyan"), traced)]
    if result.random_weights:
        lines.append(
            Text(
                f"RANDOM WEIGHTS: {result.model} is an architecture preset, so nothing was downloaded and the statistics "
                f"describe an untrained tower; for trained weights pass --model google/{result.model} or a checkpoint "
                "directory.",
                style="bold yellow",
            )
        )
    head = "attention-pool head" if cfg.vision_use_head else "no head (patch tokens only)"
    lines.append(
        Text(
            f"tower: {cfg.hidden_size} wide, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads × "
            f"{cfg.head_dim}, MLP {cfg.intermediate_size}; patch {cfg.patch_size} at {cfg.image_size} px → "
            f"{cfg.grid_size}×{cfg.grid_size} = {cfg.num_patches} patches; {head}"
        )
    )
    steps = preprocessing_steps(pre).values()
    lines.append(Text("preprocessing: " + (", then ".join(steps) or "none")))
    lines += [Text(f"note: {note}", style="yellow") for note in result.notes]
    return lines


def stage_table(
    result: Inspection, *, notes: bool = True, compact: bool = False, statistics: tuple[str, ...] = STATISTICS
) -> Table:
    """One row per stage; an encoder layer shown in full gets a section whose rows drop the `layers.i.` prefix.

    `notes` adds the "what it is" column (about 60 characters wide); `statistics` names the columns of numbers
    shown, of mean, std, min and max.
    """
    full, total = result.layers_in_full, result.config.num_hidden_layers
    if len(full) == total:
        title = "every stage of every layer"
    else:
        title = f"layer{'s' if len(full) > 1 else ''} {', '.join(map(str, full))} stage by stage, the others by output"
    table = Table(
        title=f"Stages: {title}", title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False,
        collapse_padding=compact,  # one space between compact columns, so `self_attn.attn_weights` fits in 80
    )
    # On a narrow terminal the names wrap, never the numbers (rich would cut them to "0.15…").
    table.add_column("stage", overflow="fold")
    widest = max(len(_shape_text(stage, compact)) for stage in result.stages)
    table.add_column("shape", no_wrap=True, min_width=widest)  # 1×3×32×32 cut after "32" reads as another shape
    if not compact:
        table.add_column("dtype", overflow="fold")
    for name in statistics:
        table.add_column(name, justify="right", no_wrap=True, min_width=0 if compact else 9)
    if notes:
        table.add_column("what it is", style="dim")
    group = None
    for stage in result.stages:
        layer = layer_of(stage.stage)
        label, note = stage.stage, stage.note
        if layer is not None and layer in full:
            label = "  " + stage.stage.removeprefix(f"layers.{layer}.")
        elif layer is not None:
            label, note = f"layers.{layer}", "output of the layer (its residual2)"
        if _group(stage.stage, full) != group:
            if group is not None:
                table.add_section()
            group = _group(stage.stage, full)
            if layer is not None and layer in full:
                what = f"encoder layer {layer} of {total}: x + attn(LN1(x)), then x + MLP(LN2(x))"
                blank = [""] * (len(statistics) + (1 if compact else 2))
                table.add_row(f"layers.{layer}", *blank, *([what] if notes else []), style="bold")
        values = [getattr(stage, name) for name in statistics]
        if compact:
            label += "" if stage.dtype == "float32" else f" ({stage.dtype})"
            shape, numbers = [_shape_text(stage, compact)], [_short_number(v) for v in values]
        else:
            shape, numbers = [_shape_text(stage, compact), stage.dtype], [_number(v) for v in values]
        table.add_row(label, *shape, *numbers, *([note] if notes else []))
    if compact:
        left_out = "; min and max in a wider terminal or with --json" if statistics != STATISTICS else ""
        table.caption, table.caption_justify = f"dtype float32 unless named{left_out}", "left"
    return table


def parameter_table(result: Inspection) -> Table:
    layers = result.config.num_hidden_layers
    table = Table(title="Parameters", title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("module", overflow="fold")  # in a narrow terminal the names fold, never the numbers ("92,884,2…")
    table.add_column("parameters", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    table.add_column("", style="dim", no_wrap=True)
    for module, count in result.parameters_by_module.items():
        per_layer = f"{layers} × {count // layers:,}" if module.startswith("encoder.layers.*") else ""
        table.add_row(module, f"{count:,}", f"{100 * count / result.parameters:.1f}%", per_layer)
    table.add_section()
    table.add_row("total", f"{result.parameters:,}", "100%", "", style="bold")
    return table


def cost(result: Inspection) -> Text:
    gflops = result.gflops_per_image
    amount = f"{gflops:.1f}" if gflops >= 1 else f"{gflops:.3g}"  # 35.1 for B/16; three digits for a tiny tower
    return Text.assemble(
        ("cost: ", "bold"),
        f"{amount} GFLOPs per image (multiply-add = 2 FLOPs; matmuls and the patch conv, from the formula in "
        "model.gflops_per_image)",
    )


def _shape_text(stage: Stage, compact: bool) -> str:
    return "×".join(map(str, stage.shape)) if compact else _shape(stage)


def _group(name: str, full: tuple[int, ...]) -> str:
    """Table sections: input, embeddings, each layer shown in full, each run of summarised layers, the end."""
    layer = layer_of(name)
    if layer is not None:
        return f"layer {layer}" if layer in full else f"summarised after {max((i for i in full if i < layer), default=-1)}"
    if name in ("image", "resized_image", "rescaled_pixels", "pixel_values"):
        return "input"
    if name in ("patch_embedding", "patches", "position_embedding", "embeddings"):
        return "embeddings"
    return "output"


def _shape(stage: Stage) -> str:
    return "(" + ", ".join(map(str, stage.shape)) + ")"


def _number(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.4g}"


def _short_number(value: float) -> str:
    """Three significant digits, and exponents without a leading zero: -1.47e-9, not -1.471e-09."""
    return re.sub(r"e([+-])0(\d)$", r"e\1\2", f"{value:.3g}") if math.isfinite(value) else "–"
