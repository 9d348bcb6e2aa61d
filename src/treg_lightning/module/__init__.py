"""``PreferenceModule`` and the helpers it alone uses: the start-up checks of what the loss and
regularizer need (:mod:`.checks`), hyperparameters that reload without the CLI (:mod:`.hparams`),
the learning-rate schedule (:mod:`.schedulers`), per-step seeding (:mod:`.seeding`) and the
vocabulary checks (:mod:`.vocab`).

The package sits below ``training`` / ``answers`` / ``plan`` and above ``data`` and ``rewards``;
it is usable without the CLI or the trainer.
"""

from treg_lightning.module.preference import PreferenceModule

__all__ = ["PreferenceModule"]
