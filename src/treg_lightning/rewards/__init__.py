"""Token rewards: the reward-source protocol, contrastive self-generated rewards (templates,
scoring, the fingerprinted cache), span rewards read from the data, rewards from the contrast of
two models, and a heat-map view (docs/method.md, section 1)."""

from treg_lightning.rewards.annotate import ContrastiveScorer, check_same_vocab, token_rewards
from treg_lightning.rewards.cache import (
    CacheError,
    Fingerprint,
    compute_fingerprint,
    load_or_build,
    read_meta,
)
from treg_lightning.rewards.contrastive import ContrastiveRewards
from treg_lightning.rewards.model_contrast import ModelContrastRewards
from treg_lightning.rewards.prompts import (
    PRESETS,
    ContrastiveTemplate,
    get_template,
    instruct_template,
    revise_template,
)
from treg_lightning.rewards.render import render_heatmap
from treg_lightning.rewards.source import AnnotationContext, TokenRewardSource
from treg_lightning.rewards.spans import SpanAnnotationError, SpanRewards

__all__ = [
    "PRESETS",
    "AnnotationContext",
    "CacheError",
    "ContrastiveRewards",
    "ContrastiveScorer",
    "ContrastiveTemplate",
    "Fingerprint",
    "ModelContrastRewards",
    "SpanAnnotationError",
    "SpanRewards",
    "TokenRewardSource",
    "check_same_vocab",
    "compute_fingerprint",
    "get_template",
    "instruct_template",
    "load_or_build",
    "read_meta",
    "render_heatmap",
    "revise_template",
    "token_rewards",
]
