"""SCST (caption stage 2, `ofa_ufo.training.objectives` scst_*): the leave-one-out baseline and the
loss on hand-computed cases, the gradient's direction on a tiny model, and the trainer's per-token
normalisation over the whole step (OFA's sample_size = ntokens), which duplicated examples and
gradient accumulation must leave unchanged."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, tiny_model
from PIL import Image
from safetensors.torch import load_file

from ofa_ufo.training import Trainer
from ofa_ufo.training import objectives
from ofa_ufo.training.config import config_from_dict
from ofa_ufo.training.mixture import build_batch
from ofa_ufo.training.objectives import ScstSamples, cider_rewards, leave_one_out_advantage, scst_loss, scst_sample

REPO = Path(__file__).resolve().parents[1]
PAD, EOS, START = 1, 2, 0
# 2 images x 3 beams; mean of the other two beams: image 0 -> 4, 3.5, 1.5; image 1 -> 1.5, 1.5, 0
REWARDS = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
ADVANTAGE = torch.tensor([[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]])


def test_baseline_is_the_mean_of_the_other_beams():
    torch.testing.assert_close(leave_one_out_advantage(REWARDS), ADVANTAGE)
    # one beam has no other beam to compare with: no signal rather than a division by zero
    torch.testing.assert_close(leave_one_out_advantage(torch.tensor([[5.0], [2.0]])), torch.zeros(2, 1))


def test_cider_reward_of_an_exact_and_a_disjoint_caption():
    """CIDEr-D is 10 x the mean n-gram cosine (n = 1..4): 10 for a caption equal to its only
    reference, 0 for one sharing no word with it."""
    refs = [["a red circle on the left side"], ["two blue squares near one green star"]]
    hyps = [["a red circle on the left side", "big yellow hexagon"],
            ["two blue squares near one green star", "purple ovals everywhere today"]]
    torch.testing.assert_close(cider_rewards(hyps, refs), torch.tensor([[10.0, 0.0], [10.0, 0.0]]))


class FixedLogProbs(torch.nn.Module):
    """A stand-in model whose next-token distribution is PROBS at every position; it records what it is given."""

    PROBS = torch.tensor([0.05, 0.05, 0.2, 0.3, 0.25, 0.15])

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(pad_token_id=PAD, decoder_start_token_id=START)
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, decoder_input_ids, logits_mask, **encoder_inputs):
        self.seen = {"decoder_input_ids": decoder_input_ids, **encoder_inputs}
        rows = int(logits_mask.sum())
        return SimpleNamespace(logits=self.PROBS.log().expand(rows, -1))  # (N, V) at the target tokens


# sampled tokens after the start token, -100 behind each caption's </s> (rows: image 0 beams 0-2, image 1 beams 0-2)
LABELS = torch.tensor([[3, 4, EOS], [5, EOS, -100], [3, 3, EOS],
                       [4, EOS, -100], [4, 5, EOS], [EOS, -100, -100]])


def _encoder_batch(images: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(images)[:, None], "attention_mask": torch.ones(images, 1, dtype=torch.long),
            "pixel_values": torch.zeros(images, 3, 2, 2), "image_mask": torch.ones(images, dtype=torch.bool),
            "task_ids": torch.zeros(images, dtype=torch.long)}


def test_loss_from_hand_computed_token_log_probs():
    model = FixedLogProbs()
    samples = ScstSamples(LABELS, ADVANTAGE.flatten(), REWARDS)
    loss = scst_loss(model, _encoder_batch(2), samples)
    log = math.log
    by_caption = [log(.3) + log(.25) + log(.2), log(.15) + log(.2), 2 * log(.3) + log(.2),
                  log(.25) + log(.2), log(.25) + log(.15) + log(.2), log(.2)]
    expected = -sum(a * s for a, s in zip([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0], by_caption))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert samples.tokens == 14  # </s> counts, padding does not (OFA's ntokens)
    # teacher forcing on the samples: <s> then the caption, padding where the labels are ignored
    torch.testing.assert_close(model.seen["decoder_input_ids"][:2],
                               torch.tensor([[START, 3, 4], [START, 5, EOS]]))
    torch.testing.assert_close(model.seen["decoder_input_ids"][5], torch.tensor([START, EOS, PAD]))
    # every beam row reads its own image's encoder inputs
    torch.testing.assert_close(model.seen["input_ids"][:, 0], torch.tensor([0, 0, 0, 1, 1, 1]))


def test_normalised_loss_is_unchanged_by_duplicating_the_batch():
    """The per-token mean (summed loss / sampled tokens) of a batch and of the batch twice over."""
    samples = ScstSamples(LABELS, ADVANTAGE.flatten(), REWARDS)
    twice = ScstSamples(LABELS.repeat(2, 1), ADVANTAGE.repeat(2, 1).flatten(), REWARDS.repeat(2, 1))
    once = scst_loss(FixedLogProbs(), _encoder_batch(2), samples) / samples.tokens
    doubled = scst_loss(FixedLogProbs(), _encoder_batch(4), twice) / twice.tokens
    assert twice.tokens == 28 and doubled.item() == pytest.approx(once.item(), rel=1e-6)


# ---- on the tiny model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_batch(processor):
    config = tiny_model().config
    rng = np.random.default_rng(0)
    examples = [{"task": "caption", "image": Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                 "target": target} for target in ("a red circle", "two blue squares")]
    return build_batch(processor, examples, config), [{k: v for k, v in e.items() if k != "image"} for e in examples]


def _caption_log_probs(model, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum of token log-probs of each labelled caption (B * beams,), by a full-vocabulary forward pass."""
    beams = labels.shape[0] // batch["input_ids"].shape[0]
    inputs = {k: batch[k].repeat_interleave(beams, dim=0) for k in objectives._ENCODER_KEYS}
    decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], START), labels[:, :-1].clamp(min=PAD)], 1)
    with torch.no_grad():
        logp = model(**inputs, decoder_input_ids=decoder_input_ids).logits.float().log_softmax(-1)  # (R, T, V)
    taken = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (R, T)
    return (taken * (labels != -100)).sum(1)


def test_sgd_step_raises_the_best_caption_and_lowers_the_worst(processor, caption_batch):
    batch, _ = caption_batch
    model = tiny_model(seed=1).train()
    captions = [" a red circle", " one green star", " blue", " two blue squares", " a big hexagon", " yellow"]
    ids = [processor.tokenizer(c).input_ids[1:] for c in captions]  # without <s>, with </s>
    labels = torch.full((6, max(map(len, ids))), -100)
    for row, caption in enumerate(ids):
        labels[row, :len(caption)] = torch.tensor(caption)
    samples = ScstSamples(labels, ADVANTAGE.flatten(), REWARDS)
    before = _caption_log_probs(model, batch, labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    (scst_loss(model, batch, samples) / samples.tokens).backward()
    optimizer.step()
    change = _caption_log_probs(model, batch, labels) - before
    best, worst = int(ADVANTAGE.flatten().argmax()), int(ADVANTAGE.flatten().argmin())  # beams 2 and 0 of image 0
    assert change[best] > 0 > change[worst], change
    assert torch.equal(change.sign(), ADVANTAGE.flatten().sign()), change  # each moves with its advantage


def test_sampling_returns_the_beams_with_their_rewards(processor, caption_batch):
    batch, examples = caption_batch
    model = tiny_model().train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    norms[0].eval()  # as the trainer's freeze_batchnorm leaves it
    samples = scst_sample(model, batch, examples, processor.tokenizer, beams=3, max_new_tokens=5)
    # generated in eval mode, every module handed back in the mode it came in
    assert model.training and not norms[0].training and all(m.training for m in norms[1:])
    expected = model.eval().generate(**{k: batch[k] for k in objectives._ENCODER_KEYS}, num_beams=3,
                                     num_return_sequences=3, max_new_tokens=5, no_repeat_ngram_size=3)
    assert (expected[:, 0] == START).all()
    torch.testing.assert_close(samples.labels, expected[:, 1:].masked_fill(expected[:, 1:] == PAD, -100))
    assert samples.rewards.shape == (2, 3) and samples.advantage.shape == (6,)
    # the leave-one-out advantages of an image's beams sum to zero
    torch.testing.assert_close(samples.advantage.view(2, 3).sum(1), torch.zeros(2), atol=1e-5, rtol=0)


# ---- in the trainer -------------------------------------------------------------------------------


def _text_reward(hypotheses, references) -> torch.Tensor:
    """A deterministic reward that varies between a random model's beams (its CIDEr is 0 for all)."""
    return torch.tensor([[float(sum(map(ord, h)) % 7) for h in hyps] for hyps in hypotheses])


def scst_config(output_dir: Path, **fields):
    """A tiny SCST caption run on demo scenes; AdamW with eps=1 and no clipping, so the update shows
    the gradient's scale."""
    base = dict(model_overrides=dict(TINY), tasks={"caption": 1}, objective="scst", scst_beams=3,
                scst_max_new_tokens=6, batch_size=2, max_steps=1, eval_examples=0, demo_train_scenes=16,
                num_threads=1, freeze_batchnorm=True, lr=0.05, eps=1.0, clip_norm=0.0, weight_decay=0.0,
                warmup_ratio=0.0, output_dir=str(output_dir))
    return config_from_dict({**base, **fields}, "test")


@pytest.fixture
def text_reward(monkeypatch):
    monkeypatch.setattr(objectives, "cider_rewards", _text_reward)
    threads = torch.get_num_threads()  # the runs set num_threads=1 in this process
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def scst_trainer(tmp_path, text_reward):
    # fp32 pinned: the tests compare fp32 losses and gradients to round-off, which bf16 autocast (precision
    # `auto` on a CPU with AMX / AVX512-BF16) rounds differently per micro-batch
    trainer = Trainer(scst_config(tmp_path, precision="fp32"), resume="never")
    trainer._train_mode()
    return trainer


def _step(trainer: Trainer, micro_batches) -> tuple[float, dict[str, torch.Tensor]]:
    """One train_step on the given micro-batches: (reported loss, the gradients it applied)."""
    grads: dict[str, torch.Tensor] = {}

    def keep_gradients(loss: float) -> None:
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        trainer.optimizer.zero_grad(set_to_none=True)

    trainer._micro_batches, trainer._update = (lambda: micro_batches), keep_gradients
    return trainer.train_step(), grads


def _twice(batch: dict[str, torch.Tensor], examples: list) -> tuple[dict[str, torch.Tensor], list]:
    return {k: torch.cat([v, v]) for k, v in batch.items()}, examples + examples


def test_trainer_normalises_by_the_steps_sampled_tokens(scst_trainer):
    """Same examples as one micro-batch, duplicated in one micro-batch, and as two accumulated
    micro-batches: one loss and one gradient. A raw sum (or a per-micro-batch mean summed over
    the step) doubles in the last two."""
    (batch, examples), = scst_trainer.batches.for_step(0)
    samples = scst_sample(scst_trainer.model, batch, examples, scst_trainer.processor.tokenizer, 3, 6)
    assert samples.advantage.abs().sum() > 0  # a gradient to compare
    with torch.no_grad():
        by_hand = scst_loss(scst_trainer.model, batch, samples).item() / int((samples.labels != -100).sum())
    once, grads = _step(scst_trainer, [(batch, examples)])
    duplicated, grads_duplicated = _step(scst_trainer, [_twice(batch, examples)])
    accumulated, grads_accumulated = _step(scst_trainer, [(batch, examples), (batch, examples)])
    # the loss is a small difference of terms near |advantage x log p| ~ 30: compare to float32 round-off of those
    assert once == pytest.approx(by_hand, abs=1e-6)
    assert duplicated == pytest.approx(once, abs=1e-6) and accumulated == pytest.approx(once, abs=1e-6)
    assert abs(once) > 1e-4  # a doubled loss would show
    assert grads.keys() == grads_duplicated.keys() == grads_accumulated.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_duplicated[name], grad, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(grads_accumulated[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def _short_reward(hypotheses, references) -> torch.Tensor:
    """Shorter captions score higher: a reward a few SCST steps can raise."""
    return torch.tensor([[-len(h) / 10 for h in hyps] for hyps in hypotheses])


def test_steps_raise_the_reward_of_their_batch(tmp_path, text_reward, monkeypatch):
    """Three SCST steps on one batch (near-SGD: lr 0.5, eps 1) raise the mean reward of its beams."""
    monkeypatch.setattr(objectives, "cider_rewards", _short_reward)  # in place of text_reward's
    trainer = Trainer(scst_config(tmp_path, lr=0.5, max_steps=3), resume="never")
    trainer._train_mode()
    (batch, examples), = trainer.batches.for_step(0)
    trainer._micro_batches = lambda: [(batch, examples)]

    def mean_reward() -> float:
        return float(scst_sample(trainer.model, batch, examples, trainer.processor.tokenizer, 3, 6).rewards.mean())

    before = mean_reward()
    losses = [trainer.train_step() for _ in range(3)]
    assert all(map(math.isfinite, losses)) and losses[0] != 0, losses  # 0 once every beam is as short
    assert mean_reward() > before + 0.5, before  # 5 characters shorter on average


def test_run_trains_and_exports_the_model(tmp_path, text_reward):
    """fit(): two SCST steps with finite, non-zero per-token losses (metrics.json), and an exported
    model whose decoder moved (no weight decay here: only the SCST gradient moves it)."""
    trainer = Trainer(scst_config(tmp_path, max_steps=2), resume="never")
    initial = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    result = trainer.fit()
    assert len(result.losses) == 2 and all(math.isfinite(loss) and loss != 0 for loss in result.losses)
    assert json.loads((tmp_path / "metrics.json").read_text())["losses"] == result.losses
    exported = load_file(tmp_path / "model.safetensors")
    decoder = [k for k in initial if k.startswith("model.decoder.layers.") and k in exported]
    assert decoder and any(not torch.equal(exported[k], initial[k]) for k in decoder)


# the trainer's command line with `_text_reward` in place of CIDEr, for a run in several processes
TEXT_REWARD_MAIN = """
import sys
import test_scst
from ofa_ufo.training import objectives
from ofa_ufo.training.__main__ import main
objectives.cider_rewards = test_scst._text_reward
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.xdist_group("processes")  # two processes of their own: one such test at a time
@pytest.mark.slow
def test_two_processes_match_one(text_reward, tmp_path):
    """Each process samples its half of the batch; the all-reduced token count gives the one-process
    losses and updates (normalising by each process's own count would not)."""
    reference = Trainer(scst_config(tmp_path / "one", batch_size=4, max_steps=2), resume="never").fit().losses
    script, output = tmp_path / "text_reward_main.py", tmp_path / "ddp"
    script.write_text(TEXT_REWARD_MAIN)
    config = yaml.safe_load(scst_config(output, batch_size=4, max_steps=2).to_yaml())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               "--resume", "never", *(f"{k}={json.dumps(v)}" for k, v in config.items())]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = json.loads((output / "metrics.json").read_text())["losses"]
    assert len(losses) == 2 and abs(losses[0]) > 1e-4
    assert losses == pytest.approx(reference, abs=1e-6)
