"""Seeing attention: pictures, an offline interactive page, and what each head does.

The views take :class:`AttentionMaps` (captured probabilities, per layer, head and query row),
never a model, so they work on maps from any source; the steps, the attribution and the
ablation reach into a model from outside, through an adapter (:mod:`.steps`). matplotlib,
needed by the pictures only, is imported on first use.
"""

from .ablate import ablate_heads, ablation_table
from .attribution import direct_logit_attribution, page_extras
from .heads import ROLES, HeadScores, attention_rollout, head_scores
from .html import render_html, show, write_html
from .maps import AttentionMaps
from .plot import plot_grid, plot_head, save_figure
from .steps import layer_steps, model_steps
from .steps_html import show_steps, write_steps_html

__all__ = [
    "ROLES",
    "AttentionMaps",
    "HeadScores",
    "ablate_heads",
    "ablation_table",
    "attention_rollout",
    "direct_logit_attribution",
    "head_scores",
    "layer_steps",
    "model_steps",
    "page_extras",
    "plot_grid",
    "plot_head",
    "render_html",
    "save_figure",
    "show",
    "show_steps",
    "write_html",
    "write_steps_html",
]
