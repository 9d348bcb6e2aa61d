"""The curated bugs of the mutation check (``bench/mutation.py``): one per invariant that matters.

Each mutation is one or more exact string replacements in named files (paths under the repository
root), each of which must match exactly once, and the test ids that must catch it. A refactor that
moves or rewrites the code makes the check fail loudly ("matches 0 times"): update the strings
here with it, never drop a mutation because it no longer applies.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Edit:
    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]


def mutation(name: str, tests: list[str], *edits: tuple[str, str, str]) -> Mutation:
    return Mutation(name, tuple(Edit(*edit) for edit in edits), tuple(tests))


LOSSES = "tests/losses/test_losses.py"
TREG = "tests/losses/test_treg.py"
RESUME = "tests/training/test_resume.py"
PREFLIGHT = "tests/models/test_preflight.py"

MUTATIONS = [
    # --- losses, T-REG -----------------------------------------------------------------------
    mutation(
        "DPO logits sign flipped",
        [f"{LOSSES}::test_dpo_hand_computed"],
        (
            "src/treg_lightning/losses/dpo.py",
            "logits = self.beta * (chosen_ratio - rejected_ratio)",
            "logits = self.beta * (rejected_ratio - chosen_ratio)",
        ),
    ),
    mutation(
        "SimPO gamma sign flipped",
        [f"{LOSSES}::test_simpo_hand_computed_and_length_normalized"],
        (
            "src/treg_lightning/losses/simpo.py",
            "logits = chosen_rewards - rejected_rewards - self.gamma",
            "logits = chosen_rewards - rejected_rewards + self.gamma",
        ),
    ),
    mutation(
        "IPO target 1/tau instead of 1/(2 tau)",
        [
            f"{LOSSES}::test_ipo_hand_computed",
            f"{LOSSES}::test_ipo_loss_is_zero_at_the_target_margin",
        ],
        (
            "src/treg_lightning/losses/ipo.py",
            "losses = (margin - 1 / (2 * self.tau)) ** 2",
            "losses = (margin - 1 / self.tau) ** 2",
        ),
    ),
    mutation(
        "DPO sequence weight w = sigmoid(+logits)",
        [f"{LOSSES}::test_weight_is_the_magnitude_of_the_loss_gradient"],
        (
            "src/treg_lightning/losses/dpo.py",
            "weight=torch.sigmoid(-logits).detach(),",
            "weight=torch.sigmoid(logits).detach(),",
        ),
    ),
    mutation(
        "T-REG term sign flipped",
        [f"{TREG}::test_regularizer_matches_the_formula"],
        (
            "src/treg_lightning/losses/treg.py",
            "return -token_scale.to(token_logps.dtype) * weighted.sum(-1)",
            "return token_scale.to(token_logps.dtype) * weighted.sum(-1)",
        ),
    ),
    mutation(
        "T-REG weight w not detached (stop-gradient removed in the loss and the regularizer)",
        [f"{TREG}::test_no_gradient_flows_through_the_weight"],
        (
            "src/treg_lightning/losses/treg.py",
            "weight = (out.weight if dynamic else torch.ones_like(out.weight)).detach()",
            "weight = out.weight if dynamic else torch.ones_like(out.weight)",
        ),
        (
            "src/treg_lightning/losses/dpo.py",
            "weight=torch.sigmoid(-logits).detach(),",
            "weight=torch.sigmoid(-logits),",
        ),
    ),
    mutation(
        "T-REG counts masked-out token rewards",
        [f"{TREG}::test_masked_tokens_never_count"],
        (
            "src/treg_lightning/losses/treg.py",
            "weighted = torch.where(mask, token_rewards.to(token_logps.dtype), 0.0) * torch.where(",
            "weighted = token_rewards.to(token_logps.dtype) * torch.where(",
        ),
    ),
    mutation(
        "implicit targets: SimPO uses the reference when one is cached",
        [f"{TREG}::test_implicit_target"],
        (
            "src/treg_lightning/losses/base.py",
            "    if out.uses_reference:",
            "    if scores.ref_token_logps is not None:",
        ),
    ),
    # --- log-probs, masks, packing, collation -------------------------------------------------
    mutation(
        "log-probs: token t scored from hidden state t (one-token shift lost)",
        ["tests/forward/test_logprobs.py::test_hidden_state_t_minus_1_scores_token_t"],
        (
            "src/treg_lightning/forward/logprobs.py",
            "selected_hidden = hidden[batch_idx, pos_idx - 1]",
            "selected_hidden = hidden[batch_idx, pos_idx]",
        ),
    ),
    mutation(
        "collator: response mask covers the prompt",
        ["tests/data/test_collate.py::test_batch_layout_by_hand"],
        (
            "src/treg_lightning/data/collate.py",
            "response_mask[b, start:end] = True",
            "response_mask[b, :end] = True",
        ),
    ),
    mutation(
        "collator: per-token values (reference log-probs, r_hat) one position early",
        [
            "tests/data/test_collate.py::test_batch_layout_by_hand",
            "tests/module/test_module.py::test_cached_reference_logps_are_used",
        ],
        (
            "src/treg_lightning/data/collate.py",
            "tensor[b, start:end] = _per_token(row[field(side, name)], end - start, row, side)",
            "tensor[b, start - 1 : end - 1] = _per_token(\n"
            "                    row[field(side, name)], end - start, row, side\n"
            "                )",
        ),
    ),
    mutation(
        "collator fills zero token rewards for rows without them",
        ["tests/data/test_collate.py::test_rows_without_values_give_a_batch_without_them"],
        (
            "src/treg_lightning/data/collate.py",
            "            batch.update(self._side(rows, side))\n",
            "            batch.update(self._side(rows, side))\n"
            '            batch.setdefault(field(side, "token_rewards"), torch.zeros_like(\n'
            '                batch[field(side, "input_ids")], dtype=torch.float32))\n',
        ),
    ),
    mutation(
        "packing: position_ids do not restart per sequence",
        [
            "tests/forward/test_packing.py::test_pack_batch_layout_by_hand",
            "tests/forward/test_packing.py::test_packed_equals_padded",
        ],
        (
            "src/treg_lightning/forward/packing.py",
            "position_ids = torch.arange(seq_index.numel(), device=device) - starts[seq_index]",
            "position_ids = torch.arange(seq_index.numel(), device=device)",
        ),
    ),
    # --- token rewards, the cache ---------------------------------------------------------------
    mutation(
        "r_hat = sigmoid(worse - better) - 0.5 (contexts swapped)",
        ["tests/rewards/test_annotate.py::test_rewards_match_independent_full_logits"],
        (
            "src/treg_lightning/rewards/annotate.py",
            "diff = torch.from_numpy(better_token_logps - worse_token_logps)",
            "diff = torch.from_numpy(worse_token_logps - better_token_logps)",
        ),
    ),
    mutation(
        "r_hat = sigmoid(better - worse) (the -0.5 dropped)",
        ["tests/rewards/test_annotate.py::test_rewards_match_independent_full_logits"],
        (
            "src/treg_lightning/rewards/annotate.py",
            "return (torch.sigmoid(diff * scale) - 0.5).numpy().astype(np.float32)",
            "return torch.sigmoid(diff * scale).numpy().astype(np.float32)",
        ),
    ),
    mutation(
        "passes: every rank makes every shard (no rank split)",
        [
            "tests/passes/test_passes.py::test_rank_rule_gives_shard_k_to_rank_k_mod_world_size",
            "tests/rewards/test_annotate.py::test_two_process_gloo_equals_single_process",
        ],
        (
            "src/treg_lightning/passes/shards.py",
            "return list(range(ranks.rank, self.count, ranks.world_size))",
            "return list(range(self.count))",
        ),
    ),
    mutation(
        "passes: finished parts made again (skip-if-done lost)",
        [
            "tests/passes/test_passes.py::test_todo_skips_finished_parts",
            "tests/answers/test_predict.py::test_resume_keeps_finished_shards_and_never_mixes_settings",
        ],
        (
            "src/treg_lightning/passes/shards.py",
            "return [k for k in plan.shards_of(ranks) if not done(k)]",
            "return list(plan.shards_of(ranks))",
        ),
    ),
    mutation(
        "cache fingerprint ignores the data",
        ["tests/rewards/test_cache.py::test_fingerprint_changes_with_every_input"],
        ("src/treg_lightning/rewards/cache/fingerprint.py", '"data": rows_digest(rows),', ""),
    ),
    mutation(
        "cache fingerprint ignores the template",
        ["tests/rewards/test_cache.py::test_fingerprint_changes_with_every_input"],
        (
            "src/treg_lightning/rewards/cache/fingerprint.py",
            '"template": _sha(_json(template_dict)),',
            "",
        ),
    ),
    # --- resume, the CLI, sharding --------------------------------------------------------------
    mutation(
        "resume: ResumableDataLoader skips one batch too few",
        [f"{RESUME}::test_resume_mid_epoch_equals_uninterrupted"],
        (
            "src/treg_lightning/data/resumable.py",
            "self.sampler.skip_samples = batches * (self.batch_size or 1)",
            "self.sampler.skip_samples = (batches - 1) * (self.batch_size or 1)",
        ),
    ),
    mutation(
        "resume: ResumableDataLoader skip not applied",
        [f"{RESUME}::test_resume_mid_epoch_equals_uninterrupted"],
        (
            "src/treg_lightning/data/resumable.py",
            "self.sampler.skip_samples = batches * (self.batch_size or 1)",
            "self.sampler.skip_samples = 0",
        ),
    ),
    mutation(
        "resume: an epoch cut by max_steps is not reopened",
        [f"{RESUME}::test_cli_continue_with_larger_max_steps_trains_the_rest"],
        (
            "src/treg_lightning/module/preference.py",
            "        reopen_cut_epoch(checkpoint)  #",
            "        pass  #",
        ),
    ),
    mutation(
        "treg fit ignores --ckpt_path",
        [
            "tests/training/test_faults.py::test_sigkill_mid_epoch_then_resume_equals_uninterrupted",
            f"{RESUME}::test_cli_continue_with_larger_max_steps_trains_the_rest[across-epochs]",
        ],
        (
            "src/treg_lightning/cli/main.py",
            'ckpt_path = self.config_init[self.subcommand].get("ckpt_path")',
            'ckpt_path = self.config_init[self.subcommand].pop("ckpt_path", None)',
        ),
    ),
    mutation(
        # A divide factor of 1 ("no extra scaling") instead of the data-parallel size. Gloo has
        # no PREMUL_SUM, so the reduction is forced to plain sums, then divided by that 1.
        "FSDP2: decoder-layer gradients summed across ranks, not averaged",
        ["tests/models/test_parallel.py::test_fsdp2_two_processes_equal_single_process[simpo]"],
        (
            "src/treg_lightning/models/parallel.py",
            "        fully_shard(layer, reshard_after_forward=index < len(layers) - 1, **kwargs)\n",
            "        fully_shard(layer, reshard_after_forward=index < len(layers) - 1, **kwargs)\n"
            "        layer.set_force_sum_reduction_for_comms(True)\n"
            "        layer.set_gradient_divide_factor(1.0)\n",
        ),
    ),
    # --- the audit ------------------------------------------------------------------------------
    mutation(
        "audit: ties ranked by position, not averaged",
        [
            "tests/rewards/test_audit.py::test_auroc_by_hand",
            "tests/rewards/test_audit.py::test_a_constant_source_scores_chance_exactly",
        ],
        (
            "src/treg_lightning/rewards/audit.py",
            "    ranks = rankdata(scores)\n",
            '    ranks = 1.0 + np.argsort(np.argsort(scores, kind="stable"))\n',
        ),
    ),
    mutation(
        "audit: precision@k takes tied tokens at the cut in order",
        [
            "tests/rewards/test_audit.py::test_precision_at_k_scores_ties_as_ties",
            "tests/rewards/test_audit.py::test_a_constant_source_scores_chance_exactly",
        ],
        (
            "src/treg_lightning/rewards/audit.py",
            "hits = labels[above].sum() + (k - above.sum()) * labels[tied].mean()",
            'hits = labels[np.argsort(-scores, kind="mergesort")[:k]].sum()',
        ),
    ),
    mutation(
        "audit: one response of a pair counted (the other's figure dropped)",
        [
            "tests/rewards/test_audit.py::test_both_responses_of_a_pair_count",
            "tests/rewards/test_audit.py::test_audit_rows_by_hand",
        ],
        (
            "src/treg_lightning/rewards/audit.py",
            "self.per_response[name][i].append(value)",
            "self.per_response[name][i][:] = [value]",
        ),
    ),
    mutation(
        "audit: an interval over a single pair",
        ["tests/rewards/test_audit.py::test_intervals_only_over_more_than_one_pair"],
        (
            "src/treg_lightning/rewards/audit.py",
            "if support > 1 and len(drawn):",
            "if len(drawn):",
        ),
    ),
    # --- spans ----------------------------------------------------------------------------------
    mutation(
        "spans: only the previous span checked for an overlap (nesting missed)",
        ["tests/rewards/test_spans.py::test_nested_overlap_with_different_values_is_refused"],
        (
            "src/treg_lightning/rewards/spans.py",
            "open_spans = [k for k in open_spans if spans[k][1] > start]",
            "open_spans = [k for k in open_spans if spans[k][1] > start][-1:]",
        ),
    ),
    # --- model checks ---------------------------------------------------------------------------
    mutation(
        "models: a model of the wrong kind passes",
        [f"{PREFLIGHT}::test_kinds_named_in_both_directions"],
        (
            "src/treg_lightning/models/preflight.py",
            "if facts.kind in (expected, UNKNOWN):",
            "if True:",
        ),
    ),
    mutation(
        "models: an embedding table smaller than the tokenizer passes",
        [f"{PREFLIGHT}::test_vocabulary_compared_with_the_tokenizer_it_will_be_fed"],
        (
            "src/treg_lightning/models/preflight.py",
            "if facts.vocab_size is not None and size > facts.vocab_size:",
            "if False:",
        ),
    ),
    mutation(
        "models: tokenizers compared by size only",
        [f"{PREFLIGHT}::test_vocabulary_compared_with_the_tokenizer_it_will_be_fed"],
        (
            "src/treg_lightning/models/preflight.py",
            "    if ours == theirs:\n        return []\n",
            "    if len(ours) == len(theirs):\n        return []\n",
        ),
    ),
    # --- export and its model card ---------------------------------------------------------------
    mutation(
        "export: the new export copied over the earlier one (files of both kinds mix)",
        ["tests/models/test_export_staging.py::test_overwrite_leaves_no_file_of_the_earlier_kind"],
        (
            "src/treg_lightning/models/save.py",
            "            os.replace(output_dir, replaced / output_dir.name)\n"
            "            os.replace(staging, output_dir)\n",
            "            shutil.copytree(staging, output_dir, dirs_exist_ok=True)\n",
        ),
    ),
    mutation(
        "model card: metrics logged after the exported step shown",
        ["tests/training/test_model_card.py::test_metrics_at_step_from_a_hand_written_csv"],
        (
            "src/treg_lightning/training/card_metrics.py",
            "if s + 1 <= limit and math.isfinite(v)]",
            "if math.isfinite(v)]",
        ),
    ),
    mutation(
        "model card: the checkpoint's data not named",
        ["tests/training/test_model_card.py::test_data_is_the_checkpoints_not_the_export_configs"],
        (
            "src/treg_lightning/training/card_metrics.py",
            "return None if source is None else str(source)",
            "return None",
        ),
    ),
    # --- on-policy pairs -------------------------------------------------------------------------
    mutation(
        "selection: ties among the best go to the latest seed",
        ["tests/answers/test_pairs_build.py::test_selection_against_a_hand_made_table"],
        (
            "src/treg_lightning/answers/selection.py",
            "best = min(good, key=lambda s: (-s.score, s.position))",
            "best = min(good, key=lambda s: (-s.score, -s.position))",
        ),
    ),
    mutation(
        "selection: a prompt whose samples all tie is kept",
        ["tests/answers/test_pairs_build.py::test_selection_against_a_hand_made_table"],
        (
            "src/treg_lightning/answers/selection.py",
            '        if best.score == worst.score:\n            return Choice(dropped="tied")\n',
            "",
        ),
    ),
]
