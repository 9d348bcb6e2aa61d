"""Answers of a trained policy and what is measured on them: generation backends, ``treg
predict``, prompt sets, reward-model scoring, ``treg evaluate`` and plots."""
