"""Heat map: colors on the diverging scale, escaping, one span per token with its reward."""

from __future__ import annotations

import re

from treg_lightning.rewards.render import render_heatmap, reward_color, token_pieces


def test_reward_color_scale():
    assert reward_color(0.0, 0.2) == "rgb(255,255,255)"
    assert reward_color(0.2, 0.2) == "rgb(26,152,80)"  # full green
    assert reward_color(-0.4, 0.2) == "rgb(215,48,39)"  # clipped to full red
    # a quarter of the way from white: 255 + (26 - 255) / 4 = 197.75, 255 - 103 / 4, 255 - 175 / 4
    assert reward_color(0.05, 0.2) == "rgb(198,229,211)"
    assert reward_color(0.3, 0.0) == "rgb(255,255,255)"


def test_token_pieces_rebuild_the_text(rw_tokenizer):
    text = "Bye \u00e9\u00e8 \U0001f600 <b>"
    ids = rw_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(rw_tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text


def test_render_heatmap(rw_tokenizer, rw_rows, tmp_path):
    rows = []
    for row in rw_rows:
        n_c, n_r = len(row["chosen_ids"]), len(row["rejected_ids"])
        rows.append(
            {
                **row,
                "chosen_token_rewards": [0.25 * (-1) ** t for t in range(n_c)],
                "rejected_token_rewards": [-0.1] * n_r,
            }
        )
    path = render_heatmap(rows, rw_tokenizer, tmp_path / "out" / "map.html", n=3)
    page = path.read_text(encoding="utf-8")
    spans = re.findall(r'<span style="background:(rgb\([0-9,]+\))" title="([-+0-9.]+)">', page)
    assert len(spans) == sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    assert spans[0] == ("rgb(26,152,80)", "+0.2500")  # max |r| sets the scale
    assert spans[1] == ("rgb(215,48,39)", "-0.2500")
    assert "Hi! &lt;b&gt;&amp;amp;&lt;/b&gt;" in re.sub(r"<span[^>]*>|</span>", "", page)
    assert "<b>" not in page  # all user text escaped
    assert "Pair 12" in page and "mean reward -0.1000" in page
    assert "<script" not in page and "-0.250" in page  # legend shows the scale


def test_render_limits_to_n(rw_tokenizer, rw_rows, tmp_path):
    rows = [
        {
            **r,
            "chosen_token_rewards": [0.0] * len(r["chosen_ids"]),
            "rejected_token_rewards": [0.0] * len(r["rejected_ids"]),
        }
        for r in rw_rows
    ]
    page = render_heatmap(iter(rows), rw_tokenizer, tmp_path / "m.html", n=2).read_text()
    assert page.count('<div class="pair">') == 2
