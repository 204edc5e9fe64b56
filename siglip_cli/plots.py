"""The four `siglip inspect --plot DIR` pictures, drawn with PIL and numpy only (no plotting dependency).

1. `position_embedding_similarity.png`: cosine similarity of each patch position's embedding with every other,
   one small map per position laid out on the patch grid (as in the ViT paper, figure 7).
2. `patch_embedding_filters.png`: the first patch-embedding conv filters as RGB tiles.
3. `head_attention.png`: the attention-pool head's attention over the patches, laid over the photo: where the
   image embedding looks. Skipped for towers without a head (PaliGemma).
4. `activation_norms.png`: L2 norms of the tokens in the residual stream, after the embeddings and each layer.

With random weights (an architecture preset) every picture says so under its title.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .errors import UserError
from .storage import atomic_write, replaced_together
from .text import display_path
from .tracing import Inspection, first_non_finite

# Colour ramps as anchor colours at evenly spaced positions, interpolated linearly in RGB.
VIRIDIS = ((68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
           (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37))  # fmt: skip
INFERNO = ((0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66),
           (245, 125, 21), (250, 193, 39), (252, 255, 164))  # fmt: skip

WHITE, BLACK, GREY, LIGHT, RED = (255, 255, 255), (0, 0, 0), (110, 110, 110), (225, 225, 225), (200, 30, 30)
MARGIN = 16
COLORBAR_WIDTH = 92  # the ramp, labels such as "0.25x" and the rotated title


PICTURES = (
    "position_embedding_similarity.png", "patch_embedding_filters.png", "head_attention.png", "activation_norms.png"
)  # fmt: skip


def plot_directory(directory: str | Path) -> Path:
    """`directory`, made if needed and checked writable: `siglip inspect` calls it before the model runs, so that a
    typo or a read-only folder shows at once, not after the trace (its report then thrown away)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in reversed([directory, *directory.parents]) if os.path.lexists(p) and not p.is_dir()),
                        directory)  # fmt: skip
        if blocking.is_symlink() and not blocking.exists():  # as `embed` says it
            raise UserError(
                f"{blocking} is a link to {display_path(os.readlink(blocking))}, which does not exist (an unmounted "
                "drive?); pass a directory for the plots."
            ) from None
        raise UserError(f"{blocking} is not a directory; pass a directory for the plots.") from None
    except OSError as e:
        raise UserError(f"cannot create the plot directory {directory}: {e.strerror}.") from None
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UserError(f"cannot write in the plot directory {directory}: {e.strerror}.") from None
    return directory


def write_plots(result: Inspection, directory: str | Path) -> list[Path]:
    """Draw the pictures for `result` into `directory` (`plot_directory`); return the paths written. They take their
    names together, once all are written (a full disk leaves the earlier run's as they were), and a picture this
    tower has none of (a headless tower's head attention) is removed where an earlier run left it: the folder shows
    one run."""
    # For library callers: `siglip inspect` checks first and says so in a note, as the report is still worth having.
    if broken := first_non_finite(result.stages):
        raise UserError(f"the model gave NaN or infinite values from {broken} on: there is nothing to draw.")
    directory = plot_directory(directory)
    drawn = {
        "position_embedding_similarity.png": position_similarity(result),
        "patch_embedding_filters.png": patch_filters(result),
        "head_attention.png": head_attention(result) if result.head_attention is not None else None,
        "activation_norms.png": activation_norms(result),
    }
    written = [directory / name for name in PICTURES if drawn[name] is not None]
    with replaced_together(before=lambda steps: None, after=lambda: None) as staging:
        for path in written:  # a full disk or a read-only folder: one sentence naming the file
            with atomic_write(path, staging) as f:
                drawn[path.name].save(f, format="PNG")
    for name in PICTURES:
        if drawn[name] is None:
            with contextlib.suppress(OSError):  # a folder of that name, say: not an earlier picture, and not ours
                (directory / name).unlink(missing_ok=True)
    return written


# --------------------------------------------------------------------------- the four pictures


def position_similarity(result: Inspection) -> Image.Image:
    """A grid of grid×grid maps: tile (r, c) is the similarity of position (r, c) to every position."""
    g = result.config.grid_size
    pos = F.normalize(result.position_embedding, dim=-1)
    sim = (pos @ pos.T).numpy()  # (N, N)
    step = math.ceil(g / 32)  # big grids (PaliGemma 896: 64×64) show every step-th position, subsampled
    shown = list(range(0, g, step))
    n = len(shown)
    scale = max(1, 900 // (n * n))  # about 900 px across whatever the grid
    tile, gap = n * scale, 2
    size = n * (tile + gap) - gap
    grid = np.full((size, size, 3), 255, np.uint8)
    for i, row in enumerate(shown):
        for j, col in enumerate(shown):
            similarity = sim[row * g + col].reshape(g, g)[::step, ::step]
            pixels = colormap((similarity + 1) / 2, VIRIDIS)
            y, x = i * (tile + gap), j * (tile + gap)
            grid[y : y + tile, x : x + tile] = pixels.repeat(scale, 0).repeat(scale, 1)

    font = _font(13)
    label_w, label_h = 56, 34  # room for the row/column numbers and the axis labels
    body = Image.new("RGB", (label_w + size + 24 + COLORBAR_WIDTH, label_h + size + 8), WHITE)
    body.paste(Image.fromarray(grid), (label_w, label_h))
    draw = ImageDraw.Draw(body)
    label_every = math.ceil(len(shown) / 12)
    for i, index in enumerate(shown):
        if i % label_every == 0:
            centre = i * (tile + gap) + tile / 2
            _text(draw, (label_w + centre, label_h - 4), str(index), font, GREY, "bottom")
            _text(draw, (label_w - 6, label_h + centre), str(index), font, GREY, "right")
    _text(draw, (label_w + size / 2, 2), "input patch column", font, BLACK, "top")
    row_label = _rotated_text("input patch row", font)
    body.paste(row_label, (2, label_h + (size - row_label.height) // 2))
    _colorbar(body, (label_w + size + 24, label_h), size, ("+1", "0", "-1"), "cosine similarity")
    subtitle = f"{result.config.num_patches} positions, {result.config.hidden_size}-dim: tile (row, col) is that " \
        "position's similarity with every position"
    if step > 1:
        subtitle += f"; every {step} positions shown, in both directions"
    return _figure(body, "Position-embedding similarity", subtitle, result, of_image=False)


def patch_filters(result: Inspection) -> Image.Image:
    """The first filters of the patch-embedding conv as RGB images, each scaled to its own range (grey = 0)."""
    w = result.patch_filters.numpy()  # (K, C, p, p)
    k, channels, p, _ = w.shape
    cols = min(8, k)
    rows = math.ceil(k / cols)
    scale = max(1, round(56 / p))
    tile, gap = p * scale, 4
    body = Image.new("RGB", (cols * (tile + gap) - gap + 2 * MARGIN, rows * (tile + gap) - gap + MARGIN), WHITE)
    for index, kernel in enumerate(w):
        peak = np.abs(kernel).max() or 1.0
        rgb = kernel.transpose(1, 2, 0) / peak * 0.5 + 0.5  # (p, p, C) in [0, 1]
        if channels != 3:
            rgb = np.repeat(rgb.mean(-1, keepdims=True), 3, -1)
        pixels = (rgb * 255).round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
        y, x = divmod(index, cols)
        body.paste(Image.fromarray(pixels), (MARGIN + x * (tile + gap), y * (tile + gap)))
    total = result.config.hidden_size
    subtitle = f"filters 0–{k - 1} of {total}, {p}×{p} px × RGB, each scaled to its own largest weight; grey = 0"
    return _figure(body, "Patch-embedding filters", subtitle, result, of_image=False)


def head_attention(result: Inspection) -> Image.Image:
    """The probe's attention over the patches as a heatmap on the photo: mean over heads, then each head.

    Weights are shown in multiples of uniform attention (1x: every patch weighted 1/N), which reads the same at 196
    patches or 1,024; each colour scale runs from 0 to its peak, one for the mean and one shared by the heads, so
    a head that spreads its weight evenly is uniformly bright and a sharp one dark around its peaks."""
    assert result.head_attention is not None, "a headless tower has no pooling attention"
    cfg = result.config
    (rows, cols), p = result.patch_grid, cfg.patch_size
    heads = result.head_attention.numpy().reshape(-1, rows, cols) * cfg.num_patches  # (H, rows, cols) × uniform
    seen = (cols * p, rows * p)
    covered = (seen[0] / (seen[0] + result.dropped[1]), seen[1] / (seen[1] + result.dropped[0]))  # dropped excluded
    mean = heads.mean(0)
    mean_peak, head_peak = float(mean.max()), float(heads.max())

    big, small = _fit(result.photo, 400), _fit(result.photo, 150)
    top = _captioned_row(
        [(big, "input"), (_overlay(big, mean / mean_peak, covered), "mean over heads")], per_row=2, colorbar=mean_peak
    )
    per_row = max(1, (max(top.width, 900) - MARGIN) // (max(small.width, 110) + MARGIN // 2))  # thin photos: more
    maps = [(_overlay(small, a / head_peak, covered), f"head {h}: peak {a.max():.3g}x") for h, a in enumerate(heads)]
    grid = _captioned_row(maps, per_row=per_row, colorbar=head_peak)
    body = Image.new("RGB", (max(top.width, grid.width), top.height + MARGIN + grid.height), WHITE)
    body.paste(top, (0, 0))
    body.paste(grid, (0, top.height + MARGIN))
    subtitle = (
        f"softmax weights of the learned probe over the {rows}×{cols} patches, in multiples of uniform attention "
        f"(1x = 1/{cfg.num_patches} each); colours run from 0 to the peak: the mean has its own scale, the heads "
        "share one"
    )
    if any(result.dropped):
        rows, columns = result.dropped
        strips = f"{rows} px" if rows == columns else f"{rows} px (bottom) and {columns} px (right)"
        subtitle += f"; the last {strips} strip is never seen"
    return _figure(body, "Where the image embedding looks: attention-pool head", subtitle, result)


def _captioned_row(panels: list[tuple[Image.Image, str]], *, per_row: int, colorbar: float) -> Image.Image:
    """`panels` in rows of `per_row`, each captioned below, with an inferno colour bar from 0 to `colorbar`× at
    the right. A slot is as wide as its panel or its caption, whichever is wider: a tall photo's thumbnails are
    narrower than "head 11: peak 3.2x", and captions ran into each other."""
    font = _font(13)
    caption_h = _size("head", font)[1] + 6
    slot_w = max(max(p.width, _size(caption, font)[0]) for p, caption in panels) + MARGIN // 2
    row_h = max(p.height for p, _ in panels) + caption_h
    rows = math.ceil(len(panels) / per_row)
    grid_w, grid_h = MARGIN + min(per_row, len(panels)) * slot_w, rows * row_h
    bar_h = max(row_h - caption_h, 100)  # room for its labels and title beside a panorama's thin row
    body = Image.new("RGB", (grid_w + COLORBAR_WIDTH, max(grid_h, bar_h)), WHITE)
    draw = ImageDraw.Draw(body)
    for index, (panel, caption) in enumerate(panels):
        r, c = divmod(index, per_row)
        x, y = MARGIN + c * slot_w, r * row_h
        body.paste(panel, (x + (slot_w - MARGIN // 2 - panel.width) // 2, y))
        _text(draw, (x + (slot_w - MARGIN // 2) / 2, y + panel.height + 3), caption, font, GREY, "top")
    scale = (f"{colorbar:.3g}x", f"{colorbar / 2:.3g}x", "0")
    _colorbar(body, (grid_w, 0), bar_h, scale, "x uniform", INFERNO)
    return body


def activation_norms(result: Inspection) -> Image.Image:
    """Line chart of min / mean / max token L2 norm after the embeddings and after each encoder layer."""
    norms = result.token_norms.numpy()  # (L + 1, N)
    series = {"max": (norms.max(1), (230, 120, 20)), "mean": (norms.mean(1), (40, 90, 200)),
              "min": (norms.min(1), (120, 120, 120))}  # fmt: skip
    labels = ["emb"] + [str(i) for i in range(len(norms) - 1)]
    width, height = 900, 460
    left, right, top, bottom = 70, 24, 30, 56
    body = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(body)
    font = _font(13)
    ticks = _nice_ticks(0.0, float(norms.max()))
    y_max = ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(i: int, value: float) -> tuple[float, float]:
        return left + plot_w * i / max(len(labels) - 1, 1), top + plot_h * (1 - value / y_max)

    for tick in ticks:
        _, y = xy(0, tick)
        draw.line([(left, y), (left + plot_w, y)], fill=LIGHT)
        _text(draw, (left - 6, y), f"{tick:g}", font, GREY, "right")
    label_every = math.ceil(len(labels) / 28)
    for i, label in enumerate(labels):
        if i % label_every == 0:
            x, _ = xy(i, 0)
            _text(draw, (x, top + plot_h + 6), label, font, GREY, "top")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=BLACK)
    low, high = series["min"][0], series["max"][0]
    band = [xy(i, v) for i, v in enumerate(high)] + [xy(i, v) for i, v in reversed(list(enumerate(low)))]
    draw.polygon(band, fill=(236, 242, 252))
    for name, (values, colour) in series.items():
        points = [xy(i, v) for i, v in enumerate(values)]
        draw.line(points, fill=colour, width=3, joint="curve")
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    # The legend on a white box with a frame: a line running under it stays readable on both sides.
    draw.rectangle([left + 6, top + 4, left + 168, top + 20 + 20 * len(series) - 4], fill=WHITE, outline=LIGHT)
    for k, (name, (_, colour)) in enumerate(series.items()):
        x, y = left + 14, top + 14 + 20 * k
        draw.line([(x, y), (x + 24, y)], fill=colour, width=3)
        _text(draw, (x + 30, y), f"{name} token norm", font, BLACK, "left")
    _text(draw, (left + plot_w / 2, height - 20), norms_axis_label(len(labels) - 1), font, BLACK, "top")
    axis = _rotated_text("L2 norm", font)
    body.paste(axis, (4, top + (plot_h - axis.height) // 2))
    subtitle = f"{norms.shape[1]} tokens of width {result.config.hidden_size} in the residual stream, before post_layernorm"
    return _figure(body, "Activation norms per layer", subtitle, result)


def norms_axis_label(layers: int) -> str:
    """The x axis of the activation norms: the embeddings, then each of the tower's `layers` encoder layers."""
    if layers == 0:  # a tower cut to its embeddings: "0 to -1" said nothing
        return "after the embeddings (emb): the tower has no encoder layers"
    return f"after the embeddings (emb) and after each encoder layer (0 to {layers - 1})"


# --------------------------------------------------------------------------- drawing helpers


def colormap(values: np.ndarray, anchors: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """Values in [0, 1] (clipped) → uint8 RGB, interpolating linearly between evenly spaced anchor colours."""
    positions = np.linspace(0, 1, len(anchors))
    colours = np.asarray(anchors, np.float64)
    v = np.clip(values, 0, 1)
    rgb = np.stack([np.interp(v, positions, colours[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def _overlay(photo: Image.Image, heat: np.ndarray, covered: tuple[float, float]) -> Image.Image:
    """Heatmap of a (rows, cols) map of values in [0, 1] over the part of `photo` the patch grid covers: `covered` is
    its share of the width and of the height."""
    w, h = round(photo.width * covered[0]), round(photo.height * covered[1])
    heat = Image.fromarray(heat.astype(np.float32), "F").resize((w, h), Image.BILINEAR)
    base = np.asarray(photo.convert("L").convert("RGB"), np.float64) * 0.75  # grey photo, dimmed
    out = base.copy()
    out[:h, :w] = 0.35 * base[:h, :w] + 0.65 * colormap(np.asarray(heat), INFERNO)
    return Image.fromarray(out.round().astype(np.uint8))


def _fit(image: Image.Image, longest: int) -> Image.Image:
    factor = longest / max(image.size)
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BICUBIC)


def _colorbar(
    body: Image.Image,
    xy: tuple[int, int],
    height: int,
    labels: tuple[str, str, str],
    title: str,
    anchors: tuple[tuple[int, int, int], ...] = VIRIDIS,
) -> None:
    """A vertical colour ramp `height` px tall at `xy`, labelled at its top, middle and bottom, with a rotated
    title; it takes `COLORBAR_WIDTH` px across."""
    x, y = xy
    ramp = colormap(np.linspace(1, 0, height)[:, None].repeat(16, 1), anchors)
    body.paste(Image.fromarray(ramp), (x, y))
    draw = ImageDraw.Draw(body)
    font = _font(13)
    half = _size(labels[0], font)[1] / 2  # the end labels kept inside the body, level with the ramp's ends
    for label, fraction in zip(labels, (0, 0.5, 1)):
        _text(draw, (x + 20, y + min(max(fraction * (height - 1), half), height - half)), label, font, BLACK, "left")
    caption = _rotated_text(title, font)
    body.paste(caption, (x + 66, y + (height - caption.height) // 2))


def _figure(body: Image.Image, title: str, subtitle: str, result: Inspection, *, of_image: bool = True) -> Image.Image:
    """Title, what was traced (the model, and the image for pictures of this forward pass), subtitle (wrapped)
    and, for random weights, a red warning line above `body`."""
    title_font, font = _font(20), _font(13)
    width = max(body.width, 640)
    traced = f"{result.model} on {result.image}" if of_image and result.image else result.model
    paragraphs = [(title, title_font, BLACK), (traced, font, GREY)]
    if result.random_weights:
        warning = "RANDOM WEIGHTS (architecture preset): no learned structure to see; pass a checkpoint with --model"
        paragraphs.append((warning, font, RED))
    paragraphs.append((subtitle, font, GREY))
    lines = [(line, f, colour) for text, f, colour in paragraphs for line in _wrap(_plain(text), f, width - 2 * MARGIN)]
    header = MARGIN + sum(_size(text, f)[1] + 6 for text, f, _ in lines) + 8
    canvas = Image.new("RGB", (width, header + body.height + MARGIN), WHITE)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    for text, f, colour in lines:
        draw.text((MARGIN, y), text, font=f, fill=colour)
        y += _size(text, f)[1] + 6
    canvas.paste(body, ((width - body.width) // 2, header))
    return canvas


def _plain(text: str) -> str:
    """PIL's built-in font has no ×, −, – or … glyphs: spell them in ASCII."""
    return text.translate(_ASCII)


_ASCII = str.maketrans({"×": "x", "−": "-", "–": "-", "…": "..."})


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}".strip()
        if line and _size(candidate, font)[0] > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values from `low` covering `high`: steps of 1, 2 or 5 × 10^k."""
    span = max(high - low, 1e-9)
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [low + i * step for i in range(math.ceil(span / step) + 1)]


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _size(text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom + 2


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill, align: str) -> None:
    """Draw `text` with the middle of its top, bottom, left or right edge (`align`) at `xy`: "top" hangs it centred
    below `xy`, "right" ends it there, vertically centred (works with any PIL font)."""
    text = _plain(text)
    w, h = _size(text, font)
    x, y = xy
    dx, dy = {"top": (-w / 2, 0), "bottom": (-w / 2, -h), "left": (0, -h / 2), "right": (-w, -h / 2)}[align]
    draw.text((x + dx, y + dy), text, font=font, fill=fill)


def _rotated_text(text: str, font: ImageFont.ImageFont) -> Image.Image:
    text = _plain(text)
    w, h = _size(text, font)
    label = Image.new("RGB", (w + 4, h + 4), WHITE)
    ImageDraw.Draw(label).text((2, 2), text, font=font, fill=BLACK)
    return label.rotate(90, expand=True)
