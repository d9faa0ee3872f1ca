"""Callbacks of vrpo_pl, installed as ``vrpo_pl.callbacks`` (sources in the repository's top-level ``callbacks/``).

- :class:`FrozenLMTargets`: entropy/perplexity targets of a frozen LM and key-token marks (VRPO's auxiliary loss).
- :class:`KLController`: fixed or adaptive KL coefficient, saved in checkpoints.
- :class:`SampleLogger`: prompt/response/rewards/advantages as TensorBoard text.
- :class:`KeyTokenView`: per-token advantage, value and guide entropy/surprisal of a few validation prompts.
- :class:`ValidationOutcomes`: every validation's per-question gold reward and response, as JSON lines.
- :class:`ParameterSummary`: the model summary without Lightning's FLOPs (always 0 here); the ``vrpo`` command's.
"""

from vrpo_pl.callbacks.guide_targets import FrozenLMTargets, GuideTargets
from vrpo_pl.callbacks.key_token_view import KeyTokenView, heatmap_figure, token_table
from vrpo_pl.callbacks.kl_control import KLController, adaptive_kl_update
from vrpo_pl.callbacks.parameter_summary import ParameterSummary, parameter_table, replace_default_summary
from vrpo_pl.callbacks.sample_logger import SampleLogger, samples_markdown
from vrpo_pl.callbacks.validation_outcomes import ValidationOutcomes

__all__ = [
    "FrozenLMTargets",
    "GuideTargets",
    "KLController",
    "KeyTokenView",
    "ParameterSummary",
    "SampleLogger",
    "ValidationOutcomes",
    "adaptive_kl_update",
    "heatmap_figure",
    "parameter_table",
    "replace_default_summary",
    "samples_markdown",
    "token_table",
]
