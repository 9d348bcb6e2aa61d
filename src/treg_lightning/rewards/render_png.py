"""The token-reward heat map as an image (matplotlib, the ``plots`` extra): a PNG for papers
and logs, and the same picture logged to TensorBoard / W&B.

The view is the HTML one (:mod:`treg_lightning.rewards.render`) laid out on a character grid:
per pair a header with the mean ``r_hat`` of both sides and their difference, the last prompt
turns with role labels, then chosen and rejected side by side, each token on the diverging
colour scale with its value printed under it; a colour bar on top.
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure  # no pyplot: no global backend switch for the caller
from matplotlib.image import imsave
from matplotlib.patches import Rectangle

from treg_lightning.rewards.render import (
    SIDES,
    dark_background,
    prompt_turns,
    reward_rgb,
    short_value,
    special_ids,
    token_pieces,
    token_rewards,
)

FONT = 8.0  # token text, points
CHAR = 0.6 * FONT  # width of a DejaVu Sans Mono character
ROW = 2.35 * FONT  # one token line: text + value
COLUMN_CHARS = 64  # characters per response column
GAP = 3 * CHAR
MARGIN = 14.0
PROMPT_LINES = 4  # the last prompt lines shown per pair (the HTML shows it all)


def _layout(pieces: Sequence[str], width: int) -> tuple[list[tuple[int, int, int, str]], int]:
    """``[(line, column, width, text)]`` of tokens wrapped to ``width`` characters."""
    placed, line, column = [], 0, 0
    for piece in pieces:
        text = piece.replace("\n", "↵")
        cells = max(len(text), 3)  # room for the value under it
        if column + cells > width and column > 0:
            line, column = line + 1, 0
        placed.append((line, column, cells, text))
        column += cells
        if "\n" in piece:
            line, column = line + 1, 0
    return placed, (line + 1 if placed else 0)


def _prompt_lines(tokenizer, prompt_ids, width: int) -> list[tuple[str, str]]:
    lines = []
    for role, text in prompt_turns(tokenizer, prompt_ids):
        wrapped = []
        for paragraph in text.splitlines() or [""]:
            wrapped += textwrap.wrap(paragraph, width) or [""]
        lines += [(role if i == 0 else "", line) for i, line in enumerate(wrapped)]
    if len(lines) > PROMPT_LINES:
        lines = [("", "[...]")] + lines[-(PROMPT_LINES - 1) :]
    return lines


def _pair_block(tokenizer, row: Mapping[str, Any]) -> dict[str, Any]:
    specials = special_ids(tokenizer)
    sides = {}
    for side in SIDES:
        ids = list(row[f"{side}_ids"])
        pieces = ["end" if t in specials else p for t, p in zip(ids, token_pieces(tokenizer, ids),
                                                                 strict=True)]  # fmt: skip
        placed, lines = _layout(pieces, COLUMN_CHARS)
        sides[side] = {"placed": placed, "lines": lines, "rewards": token_rewards(row, side),
                       "special": [t in specials for t in ids]}  # fmt: skip
    prompt = _prompt_lines(tokenizer, row["prompt_ids"], 2 * COLUMN_CHARS - 10)
    height = (1.8 + 1.2 * len(prompt) + 1.6) * FONT * 1.25
    height += max(s["lines"] for s in sides.values()) * ROW + FONT
    return {"row": row, "sides": sides, "prompt": prompt, "height": height}


def heatmap_figure(rows: Iterable[Mapping[str, Any]], tokenizer, n: int = 4):
    """A matplotlib figure of the first ``n`` cache rows."""
    shown = [row for _, row in zip(range(n), rows, strict=False)]
    scale = max((abs(r) for row in shown for s in SIDES for r in token_rewards(row, s)),
                default=0.0)  # fmt: skip
    blocks = [_pair_block(tokenizer, row) for row in shown]
    width = 2 * MARGIN + 2 * COLUMN_CHARS * CHAR + GAP
    legend = 42.0
    height = 2 * MARGIN + legend + sum(b["height"] for b in blocks) + 10 * len(blocks)
    fig = Figure(figsize=(width / 72, height / 72), dpi=150)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # y grows downwards, in points
    ax.axis("off")
    _legend(fig, ax, scale, width, height)
    y = MARGIN + legend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glyphs missing from the font (emoji) draw as boxes
        for block in blocks:
            y = _draw_pair(ax, block, scale, y) + 10
    return fig


def _legend(fig, ax, scale: float, width: float, height: float) -> None:
    ax.text(MARGIN, MARGIN + 4, "Token rewards r\u0302", fontsize=11, weight="bold", va="top")
    colours = [np.array(reward_rgb(v, 1.0)) / 255 for v in np.linspace(-1, 1, 21)]
    cmap = LinearSegmentedColormap.from_list("rhat", colours)
    bar = fig.add_axes((0.62, 1 - (MARGIN + 12) / height, 0.33, 9 / height))
    bar.imshow(np.linspace(-scale, scale, 256)[None, :], aspect="auto", cmap=cmap,
               extent=(-scale, scale, 0, 1))  # fmt: skip
    bar.set_yticks([])
    bar.set_xticks(np.linspace(-scale, scale, 5))
    bar.xaxis.set_major_formatter("{x:+.2f}")
    bar.tick_params(labelsize=6, length=2, pad=1)
    ax.text(0.61 * width, MARGIN + 7, "r\u0302: blue = favoured by the evaluator's contrastive "
            "prompts, red = disfavoured ", fontsize=6.5, ha="right", va="center",
            color="#444444")  # fmt: skip


def _draw_pair(ax, block: dict[str, Any], scale: float, top: float) -> float:
    row, sides = block["row"], block["sides"]
    means = {side: float(np.mean(s["rewards"])) if s["rewards"] else 0.0 for side, s in
             sides.items()}  # fmt: skip
    line = FONT * 1.25
    ax.add_patch(Rectangle((MARGIN / 2, top), ax.get_xlim()[1] - MARGIN, block["height"],
                           fill=False, edgecolor="#bbbbbb", linewidth=0.6))  # fmt: skip
    y = top + 0.6 * line
    ax.text(MARGIN, y, f"Pair {row.get('index', '')}", fontsize=9, weight="bold", va="top")
    ax.text(MARGIN + 60, y, f"mean r\u0302  chosen {means['chosen']:+.4f}   rejected "
            f"{means['rejected']:+.4f}   \u0394 {means['chosen'] - means['rejected']:+.4f}",
            fontsize=8, va="top", color="#444444")  # fmt: skip
    y += 1.2 * line
    for role, text in block["prompt"]:
        ax.text(MARGIN + 50, y, role.upper(), fontsize=6, weight="bold", ha="right", va="top",
                color="#8a5a00" if role == "user" else "#555555")  # fmt: skip
        ax.text(MARGIN + 56, y, text, fontsize=7, va="top", family="DejaVu Sans")
        y += 1.2 * line
    y += 0.4 * line
    for k, side in enumerate(SIDES):
        x0 = MARGIN + k * (COLUMN_CHARS * CHAR + GAP)
        ax.text(x0, y, f"{side}   mean r\u0302 {means[side]:+.4f} \u00b7 "
                f"{len(sides[side]['rewards'])} tokens", fontsize=8, va="top", weight="bold",
                color="#1d5e20" if side == "chosen" else "#8b1a1a")  # fmt: skip
        body = y + 1.3 * line
        tokens = zip(sides[side]["placed"], sides[side]["rewards"], sides[side]["special"],
                     strict=True)  # fmt: skip
        for (ln, col, cells, text), reward, special in tokens:
            x, yy = x0 + col * CHAR, body + ln * ROW
            colour = np.array(reward_rgb(reward, scale)) / 255
            ax.add_patch(Rectangle((x, yy), cells * CHAR - 0.8, ROW - 1.5, facecolor=colour,
                                   edgecolor="#777777" if special else "none", linewidth=0.5,
                                   linestyle="--"))  # fmt: skip
            ink = "white" if dark_background(reward, scale) else "black"
            ax.text(x + 0.2, yy + 0.5, text, fontsize=FONT, family="DejaVu Sans Mono", va="top",
                    color=ink)  # fmt: skip
            ax.text(x + cells * CHAR / 2, yy + ROW - 2.2, short_value(reward), fontsize=4.6,
                    ha="center", va="bottom", color=ink)  # fmt: skip
    return top + block["height"]


def figure_array(fig) -> np.ndarray:
    """The figure as an ``[H, W, 3]`` uint8 RGB array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def render_heatmap_png(rows: Iterable[Mapping[str, Any]], tokenizer, path: str | Path,
                       n: int = 4) -> tuple[Path, np.ndarray]:  # fmt: skip
    """Write the PNG heat map of the first ``n`` rows; returns the path and the RGB array."""
    image = figure_array(heatmap_figure(rows, tokenizer, n))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, image)
    return path, image


def log_heatmap_image(loggers: Sequence[Any], image: np.ndarray, step: int,
                      tag: str = "token_rewards") -> list[str]:  # fmt: skip
    """Log the image to every TensorBoard / W&B logger attached; returns the loggers used."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    used = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
            logger.experiment.flush()
            used.append("tensorboard")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[image], step=step)
            used.append("wandb")
    return used
