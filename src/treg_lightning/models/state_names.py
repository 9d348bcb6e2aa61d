"""How the policy's weights are named in a ``PreferenceModule`` state (checkpoints, exports)."""

# The policy is the module's ``policy`` attribute: its weights are ``policy.<HF name>``.
POLICY_PREFIX = "policy."
# Activation checkpointing's wrapper (checkpoint_wrapper) may leave this in saved weight names.
WRAPPER_PREFIX = "_checkpoint_wrapped_module."
