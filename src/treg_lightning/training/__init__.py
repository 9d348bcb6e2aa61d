"""Training around :class:`~treg_lightning.module.PreferenceModule`: the ``treg`` trainer,
callbacks, guards, schedulers, seeding, hyperparameters and start-up checks."""
