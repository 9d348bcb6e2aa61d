"""Heat map: the diverging scale, chat turns without special tokens, one token box per token
with its value, sortable pairs, both cache column names; the PNG and its TensorBoard image."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from treg_lightning.rewards.render import (
    has_token_rewards,
    prompt_turns,
    render_heatmap,
    reward_color,
    short_value,
    token_pieces,
    token_rewards,
)


def test_reward_color_scale():
    assert reward_color(0.0, 0.2) == "rgb(255,255,255)"
    assert reward_color(0.2, 0.2) == "rgb(33,102,172)"  # full blue
    assert reward_color(-0.4, 0.2) == "rgb(178,24,43)"  # clipped to full red
    # a quarter of the way from white: 255 + (33 - 255) / 4 = 199.5, 255 - 153 / 4, 255 - 83 / 4
    assert reward_color(0.05, 0.2) == "rgb(200,217,234)"
    assert reward_color(0.3, 0.0) == "rgb(255,255,255)"
    assert short_value(0.1234) == "+.12" and short_value(-0.005) == "-.01"


def test_token_pieces_rebuild_the_text(rw_tokenizer):
    text = "Bye \u00e9\u00e8 \U0001f600 <b>"
    ids = rw_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(rw_tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text


def test_prompt_turns_read_roles_from_three_template_styles(
    rw_tokenizer, rw_nosystem_tokenizer, rw_rows, tiny_model_dir
):
    from transformers import AutoTokenizer

    assert prompt_turns(rw_tokenizer, rw_rows[1]["prompt_ids"]) == [
        ("system", "Be brief."),
        ("user", "Name a prime."),
        ("assistant", "2."),
        ("user", "Another one?"),
    ]  # ChatML: <|im_start|>role\n ... <|im_end|>
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Bye"}]  # fmt: skip
    gemma = rw_nosystem_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = rw_nosystem_tokenizer(gemma, add_special_tokens=False)["input_ids"]
    assert prompt_turns(rw_nosystem_tokenizer, ids) == [
        ("user", "Hi"), ("model", "Yo"), ("user", "Bye")
    ]  # fmt: skip
    tiny = AutoTokenizer.from_pretrained(tiny_model_dir)  # literal <|user|> markers
    text = tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tiny(text, add_special_tokens=False)["input_ids"]
    assert prompt_turns(tiny, ids) == [("user", "Hi"), ("assistant", "Yo"), ("user", "Bye")]
    cut = rw_rows[1]["prompt_ids"][8:]  # a prompt cut from the left mid-turn
    assert prompt_turns(rw_tokenizer, cut)[0] == ("…", "Be brief.")


def rows_with_rewards(rows, old_names: bool = False):
    out = []
    for row in rows:
        n_c, n_r = len(row["chosen_ids"]), len(row["rejected_ids"])
        names = ("chosen_rewards", "rejected_rewards") if old_names else (
            "chosen_token_rewards", "rejected_token_rewards")  # fmt: skip
        out.append({**row, names[0]: [0.25 * (-1) ** t for t in range(n_c)],
                    names[1]: [-0.1] * n_r})  # fmt: skip
    return out


@pytest.mark.parametrize("old_names", [False, True])
def test_render_heatmap(rw_tokenizer, rw_rows, tmp_path, old_names):
    rows = rows_with_rewards(rw_rows, old_names)
    assert has_token_rewards(rows[0]) and not has_token_rewards(["chosen_ids"])
    path = render_heatmap(rows, rw_tokenizer, tmp_path / "out" / "map.html", n=3)
    page = path.read_text(encoding="utf-8")
    boxes = re.findall(
        r'<span class="t[^"]*" style="background:(rgb\([0-9,]+\))" title="([-+0-9.]+)">'
        r'<span class="p">([^<]*)</span><span class="v">([-+.0-9]+)</span>',
        page,
    )
    assert len(boxes) == sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    assert boxes[0] == ("rgb(33,102,172)", "+0.2500", "P", "+.25")  # max |r| sets the scale
    assert boxes[1] == ("rgb(178,24,43)", "-0.2500", "a", "-.25")
    ends = [b for b in boxes if b[2] == "end"]  # the end-of-turn token, as a badge
    assert len(ends) == 6
    text = re.sub(r"<[^>]+>", "", page)
    assert "<|im_start|>" not in text and "<|im_end|>" not in text  # no raw special tokens
    start = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows[:2])
    third = "".join(b[2] for b in boxes[start : start + len(rows[2]["chosen_ids"])])
    assert third == "Hi! &lt;b&gt;&amp;amp;&lt;/b&gt; (2)end"  # escaped text, then the badge
    assert "<b>&" not in page  # all user text escaped
    # Per pair: the means and delta = mean(chosen) - mean(rejected), as the sort key.
    first = rows[0]
    mean_c = sum(token_rewards(first, "chosen")) / len(first["chosen_ids"])
    assert "Pair 10<span" in page and f"<b>{mean_c:+.4f}</b>" in page
    deltas = [float(d) for d in re.findall(r'data-delta="([-0-9.]+)"', page)]
    assert deltas[0] == pytest.approx(mean_c + 0.1, abs=1e-6)
    assert 'id="order"' in page and "<script>" in page and "http" not in page
    assert "-0.25" in page and "+0.25" in page  # the legend's ends


def test_render_limits_to_n(rw_tokenizer, rw_rows, tmp_path):
    rows = rows_with_rewards(rw_rows)
    page = render_heatmap(iter(rows), rw_tokenizer, tmp_path / "m.html", n=2).read_text()
    assert page.count('<section class="pair"') == 2


def test_png_and_tensorboard_image(rw_tokenizer, rw_rows, tmp_path):
    """The PNG holds the scale's two ends (the +-0.25 tokens); the TensorBoard event file,
    read back, holds the same image at the given step."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from matplotlib import image as mpimg
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from treg_lightning.rewards.render_png import log_heatmap_image, render_heatmap_png

    path, image = render_heatmap_png(rows_with_rewards(rw_rows), rw_tokenizer, tmp_path / "m.png")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    on_disk = (mpimg.imread(path)[..., :3] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(on_disk, image)
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert (33, 102, 172) in colours and (178, 24, 43) in colours

    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    assert log_heatmap_image([logger], image, step=7) == ["tensorboard"]
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    (logged,) = events.Images("token_rewards")
    assert logged.step == 7 and (logged.height, logged.width) == image.shape[:2]
    decoded = mpimg.imread(io.BytesIO(logged.encoded_image_string), format="png")
    np.testing.assert_array_equal((decoded[..., :3] * 255).round().astype(np.uint8), image)


def test_export_on_fit_end_writes_html_png_and_logs_the_image(rw_tokenizer, rw_rows, tmp_path):
    """The callback after fit: heat map HTML + PNG beside it + the image in TensorBoard."""
    from types import SimpleNamespace

    import datasets
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from treg_lightning.data.datamodule import PreferenceDataModule
    from treg_lightning.training.callbacks import ExportOnFitEnd

    rows = rows_with_rewards(rw_rows)
    cache = datasets.Dataset.from_list([{k: r[k] for k in (
        "index", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_token_rewards",
        "rejected_token_rewards")} for r in rows])  # fmt: skip
    logger = TensorBoardLogger(tmp_path / "tb", name="run")
    data = PreferenceDataModule(rewards=None)
    data.tokenizer, data.datasets = rw_tokenizer, {"train": cache}
    trainer = SimpleNamespace(
        datamodule=data,
        loggers=[logger], is_global_zero=True, global_step=3, log_dir=logger.log_dir,
        checkpoint_callback=None,
    )  # fmt: skip
    callback = ExportOnFitEnd(export_dir=None, heatmap_path=str(tmp_path / "map.html"))
    callback.on_fit_end(trainer, SimpleNamespace(model_name="unused"))
    assert (tmp_path / "map.html").is_file() and (tmp_path / "map.png").is_file()
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("token_rewards")] == [3]
