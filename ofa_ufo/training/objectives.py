"""Training objectives: summed token losses plus the token count they were summed over.

Returning sums (not means) lets the trainer divide by the token count of the whole optimizer
step over every micro-batch and process, so gradient accumulation and distributed runs give
the same update as one big batch. Embedding tasks add per-task mean feature-head losses
(CosFace + triplet, `head_losses`), read out of the same forward pass. SCST comes in two halves
(`scst_sample`, `scst_loss`) because its token count is only known once its captions are sampled.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pycocoevalcap.cider.cider import Cider

from ofa_ufo.hf.modeling import embedding_readout, shift_tokens_right
from ofa_ufo.tasks import get_task

_ENCODER_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_mask", "task_ids")


def cross_entropy(model, batch: dict[str, torch.Tensor], label_smoothing: float) -> tuple[torch.Tensor, int]:
    """Label-smoothed token cross-entropy summed over target tokens (labels -100 are ignored)."""
    loss, tokens, _, _ = cross_entropy_and_features(model, batch, label_smoothing)
    return loss, tokens


def cross_entropy_and_features(model, batch: dict[str, torch.Tensor],
                               label_smoothing: float) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """`cross_entropy` plus every row's raw embedding read-out (B, D) from the same forward pass
    (`embedding_readout`: the decoder is causal, so step 0 sees only the start token; or the mean
    image token), for the feature heads of embedding tasks, whose label rows are all ignored, and
    the encoder's output states (B, L, D), for the tasks' auxiliary losses (`Task.auxiliary_loss`)."""
    config = getattr(model, "module", model).config
    labels = batch["labels"]
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    targets = labels != -100  # (B, T): logits only there, not at the padding behind short targets
    outputs = model(**{k: batch[k] for k in _ENCODER_KEYS}, decoder_input_ids=decoder_input_ids,
                    code_grid=batch.get("code_grid"), logits_mask=targets)  # code_grid: image-generation rows
    loss = F.cross_entropy(outputs.logits.float(), labels[targets], label_smoothing=label_smoothing,
                           reduction="sum")  # logits (N, V) for the N target tokens
    features = embedding_readout(config, outputs.decoder_last_hidden_state, outputs.image_embedding)
    return loss, int(targets.sum()), features, outputs.encoder_last_hidden_state


def head_losses(heads, features: torch.Tensor, examples: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Sum over the tasks with a feature head (`heads`: task -> head) of each task's mean
    `head_loss` on its rows of the micro-batch; 0 when none is present."""
    total = features.new_zeros((), dtype=torch.float32)
    for task, head in heads.items():
        rows = [i for i, example in enumerate(examples) if example["task"] == task]
        if rows:
            total = total + get_task(task).head_loss(head, features[rows], [examples[i] for i in rows])
    return total


def _words(text: str) -> str:
    """Lower-case words without punctuation: the tokenisation CIDEr rewards are computed on."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def cider_rewards(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> torch.Tensor:
    """CIDEr-D of every hypothesis (rows: images, columns: samples) against its image's references;
    document frequencies come from the references given (the batch)."""
    gts, res = {}, {}
    for i, (hyps, refs) in enumerate(zip(hypotheses, references)):
        for j, hyp in enumerate(hyps):
            gts[(i, j)] = [_words(r) for r in refs]
            res[(i, j)] = [_words(hyp) or "."]
    keys = list(gts)
    _, scores = Cider().compute_score({n: gts[k] for n, k in enumerate(keys)}, {n: res[k] for n, k in enumerate(keys)})
    return torch.tensor(scores, dtype=torch.float32).view(len(hypotheses), -1)  # (images, samples)


def leave_one_out_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """Each sample's reward minus the mean reward of its image's other samples (OFA's SCST baseline):
    (images, samples) -> (images, samples); a single sample has no baseline (advantage 0)."""
    samples = rewards.shape[1]
    if samples == 1:
        return torch.zeros_like(rewards)
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (samples - 1)


@dataclass
class ScstSamples:
    """One micro-batch's sampled captions, as the SCST loss reads them."""

    labels: torch.Tensor  # (B * beams, T): sampled tokens after the start token, -100 at padding
    advantage: torch.Tensor  # (B * beams,): reward - leave-one-out baseline
    rewards: torch.Tensor  # (B, beams): CIDEr-D of each sample

    @property
    def tokens(self) -> int:
        """Sampled target tokens (EOS included): the SCST loss's normaliser, as OFA's `ntokens`."""
        return int((self.labels != -100).sum())


def scst_sample(model, batch: dict[str, torch.Tensor], examples: Sequence[dict[str, Any]], tokenizer,
                beams: int, max_new_tokens: int) -> ScstSamples:
    """SCST's sampling half (OFA's caption stage 2): beam search in eval mode returns `beams`
    captions per image, each rewarded by CIDEr-D against the image's references. Kept apart from
    `scst_loss` so a trainer can sample a whole step first and know its token count before backward."""
    inner = getattr(model, "module", model)
    modes = {module: module.training for module in inner.modules()}  # e.g. BatchNorm kept in eval by the trainer
    inner.eval()
    with torch.no_grad():
        sequences = inner.generate(**{k: batch[k] for k in _ENCODER_KEYS}, num_beams=beams,
                                   num_return_sequences=beams, max_new_tokens=max_new_tokens,
                                   no_repeat_ngram_size=3)  # (B * beams, T + 1)
    for module, training in modes.items():
        module.training = training
    texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    hypotheses = [texts[i * beams:(i + 1) * beams] for i in range(len(examples))]
    rewards = cider_rewards(hypotheses, [e.get("references") or [e["target"]] for e in examples])  # (B, beams)
    labels = sequences[:, 1:].masked_fill(sequences[:, 1:] == inner.config.pad_token_id, -100)  # drop the start token
    return ScstSamples(labels, leave_one_out_advantage(rewards).flatten().to(labels.device), rewards)


def scst_loss(model, batch: dict[str, torch.Tensor], samples: ScstSamples) -> torch.Tensor:
    """SCST's loss half: -sum over the sampled tokens of log p(token) * advantage, with the model
    re-run (in its current mode) on the samples. A sum, as OFA's `scst_loss`: the caller divides by
    the sampled tokens of the whole step (`ScstSamples.tokens`; OFA's sample_size is ntokens, a
    per-token mean, since its caption stage 2 does not set sentence_avg)."""
    config = getattr(model, "module", model).config
    labels = samples.labels
    beams = labels.shape[0] // batch["input_ids"].shape[0]
    repeated = {k: batch[k].repeat_interleave(beams, dim=0) for k in _ENCODER_KEYS}  # (B * beams, ...)
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    targets = labels != -100  # (B * beams, T)
    logits = model(**repeated, decoder_input_ids=decoder_input_ids, logits_mask=targets).logits  # (N, V)
    token_logp = -F.cross_entropy(logits.float(), labels[targets], reduction="none")  # (N,)
    return -(token_logp * samples.advantage[:, None].expand_as(labels)[targets]).sum()
