"""Self-generated token rewards: contrastive templates, the annotate pass, the on-disk cache and
a heat-map view (METHOD.md section 1)."""

from treg_lightning.rewards.annotate import TokenRewardAnnotator, check_same_vocab, token_rewards
from treg_lightning.rewards.cache import (
    CacheError,
    Fingerprint,
    annotation_fingerprint,
    cached_token_rewards,
    compute_fingerprint,
    load_or_build,
    read_meta,
)
from treg_lightning.rewards.prompts import (
    PRESETS,
    ContrastiveTemplate,
    get_template,
    instruct_template,
    revise_template,
)
from treg_lightning.rewards.render import render_heatmap

__all__ = [
    "PRESETS",
    "CacheError",
    "ContrastiveTemplate",
    "Fingerprint",
    "TokenRewardAnnotator",
    "annotation_fingerprint",
    "cached_token_rewards",
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
