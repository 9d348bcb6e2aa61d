"""Training around :class:`~treg_lightning.module.PreferenceModule`: the ``treg`` trainer and its
verbs, callbacks, guards and the model card (the module's own helpers live in
:mod:`treg_lightning.module`)."""
