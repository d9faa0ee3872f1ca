"""The key-token heat map: one colour scale per quantity shared by the prompts, advantages centred at 0."""

from __future__ import annotations

from vrpo_pl.callbacks.key_token_view import heatmap_figure, row_scales, token_table


def _views():
    right = {"prompt": "3 + 4 =", "gold": 1.0, "tokens": ["7", "<eos>"], "advantage": [0.9, 0.2],
             "value": [0.4, 0.8], "entropy": [1.5, 0.1], "surprisal": [2.0, 0.3]}
    wrong = {"prompt": "2 + 2 =", "gold": 0.0, "tokens": ["5", "<eos>"], "advantage": [-0.3, -0.1],
             "value": [0.5, 0.2], "entropy": [2.5, 0.2], "surprisal": [3.0, 0.1]}
    return [right, wrong]


def test_advantage_scale_is_symmetric_and_shared_value_scale_covers_the_rewards():
    scales = row_scales(_views())
    cmap, low, high = scales["advantage"]
    assert cmap == "RdBu" and low == -high == -0.9  # the wrong answer's -0.3 is pale red, not full colour
    assert scales["value"][1:] == (0.0, 1.0)
    assert scales["entropy"][1:] == (0.0, 2.5) and scales["surprisal"][1:] == (0.0, 3.0)


def test_heatmap_and_table_render(tmp_path):
    figure = heatmap_figure(_views())
    path = tmp_path / "heatmap.png"
    figure.savefig(path)
    assert path.stat().st_size > 5_000
    assert "advantage [-0.9, 0.9]" in [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert "| advantage | 0.90 | 0.20 |" in token_table(_views()[0])
