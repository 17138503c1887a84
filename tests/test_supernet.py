"""UFO supernet: routing, mixed-task batches, elastic archs and dense subnet extraction."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import pipeline

import ofa_ufo
from ofa_ufo.deploy.subnets import largest_arch, smallest_arch

SUPERNET = dict(
    supernet_layers=2, supernet_dim=32, supernet_heads=4, supernet_head_dim=8, supernet_mlp_ratio=2.0,
    supernet_elastic_heads=[2, 3, 4], supernet_elastic_mlp_ratios=[1.0, 1.5, 2.0], supernet_elastic_depths=[1, 2],
)


def supernet_model(seed: int = 0) -> ofa_ufo.OFAUFOForConditionalGeneration:
    """A tiny routed supernet whose routers and task experts differ per task and whose residual outputs
    are non-zero (as after training; at init they are 0, so the blocks would be the identity)."""
    model = tiny_model(seed, vision_config=SUPERNET)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.get_encoder().supernet.blocks:
            block.ffn.router.copy_(torch.randn(block.ffn.router.shape, generator=generator))
            for p in [*block.ffn.experts.parameters(), block.attn.proj.weight, block.ffn.shared.fc2.weight]:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def test_fresh_supernet_blocks_are_the_identity():
    """Residual outputs start at 0, so fresh blocks pass the stem's grid through unchanged; the other
    weights are random, so training moves the residual outputs off 0 at once."""
    model = tiny_model(0, vision_config=SUPERNET)
    supernet = model.get_encoder().supernet
    x = torch.randn(2, 5, SUPERNET["supernet_dim"])
    tasks = routes(model, "caption", "face")
    for block in supernet.blocks:
        assert not block.attn.proj.weight.any() and not block.ffn.shared.fc2.weight.any()
        assert not block.ffn.experts.fc2_weight.any() and block.ffn.shared.fc1.weight.std() > 0
        torch.testing.assert_close(block(x, tasks, None, None), x)


@pytest.fixture(scope="module")
def supernet():
    return supernet_model()


@pytest.fixture(scope="module")
def inputs(processor):
    torch.manual_seed(0)
    images = [(torch.rand(48, 64, 3) * 255).to(torch.uint8).numpy() for _ in range(3)]
    batch = processor(images=images, text=[" what does the image describe?", " a b c", " what?"], return_tensors="pt")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_mask")}


def routes(model, *tasks: str) -> torch.Tensor:
    """Each task's route id in `model`'s own task vocabulary."""
    return torch.tensor([model.config.vision_config.route_id(task) for task in tasks])


def _logits(model, inputs, task_ids=None):
    decoder = torch.zeros(inputs["input_ids"].shape[0], 3, dtype=torch.long)
    with torch.no_grad():
        return model(**inputs, task_ids=task_ids, decoder_input_ids=decoder).logits


def test_zero_blocks_is_exactly_the_foundation_model(inputs):
    plain, explicit = tiny_model(), tiny_model(vision_config={"supernet_layers": 0})
    assert plain.get_encoder().supernet is None and set(plain.state_dict()) == set(explicit.state_dict())
    assert torch.equal(_logits(plain, inputs), _logits(explicit, inputs))


def test_routed_supernet_needs_task_ids(supernet, inputs):
    with pytest.raises(ValueError, match="pass task_ids"):
        _logits(supernet, inputs)


def test_mixed_task_batch_equals_each_sample_alone(supernet, inputs):
    tasks = routes(supernet, "caption", "grounding", "vqa")
    mixed = _logits(supernet, inputs, tasks)
    for i in range(3):
        alone = _logits(supernet, {k: v[i : i + 1] for k, v in inputs.items()}, tasks[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1, :, :], alone, atol=1e-5, rtol=1e-5)


def test_routers_get_gradients_through_the_straight_through_gate(inputs):
    model = supernet_model().train()
    labels = torch.full((3, 2), 5)
    model(**inputs, task_ids=torch.tensor([0, 1, 1]), labels=labels).loss.backward()
    grads = [block.ffn.router.grad for block in model.get_encoder().supernet.blocks]
    assert all(g is not None and g[:2].abs().sum() > 0 and g[2:].abs().sum() == 0 for g in grads)


@pytest.mark.parametrize("task", ofa_ufo.list_tasks())
def test_extracted_subnet_matches_routed_supernet(supernet, inputs, task):
    dense = ofa_ufo.extract_subnet(supernet, task)
    assert dense.get_encoder().supernet.routed is False
    assert not any("router" in k or "experts" in k for k in dense.state_dict())
    ids = routes(supernet, task, task, task)
    diff = (_logits(supernet, inputs, ids) - _logits(dense, inputs)).abs().max()
    assert diff < 1e-5, diff


@pytest.mark.parametrize("readout", ["decoder", "image"])
@pytest.mark.parametrize("task", ["reid_person", "reid_vehicle", "face", "product"])
def test_extracted_subnet_gives_the_supernets_embeddings(supernet, inputs, task, readout):
    """AllInOne deployment: each embedding task's dense subnet returns the routed supernet's vectors,
    under either embedding read-out."""
    supernet.config.embedding_readout = readout
    try:
        dense = ofa_ufo.extract_subnet(supernet, task)
        encoder_inputs = (inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        with torch.no_grad():
            routed = supernet.embed(*encoder_inputs, routes(supernet, task, task, task), inputs["image_mask"])
            extracted = dense.embed(*encoder_inputs, None, inputs["image_mask"])
    finally:
        supernet.config.embedding_readout = "decoder"
    assert dense.config.embedding_readout == readout
    assert routed.shape == (3, supernet.config.d_model)
    assert (routed - extracted).abs().max() < 1e-5


@pytest.mark.parametrize("step", [3, 11])
def test_extracted_elastic_subnet_matches(supernet, inputs, step):
    arch = ofa_ufo.sample_arch(supernet.config, step)
    assert arch == ofa_ufo.sample_arch(supernet.config, step)  # reproducible per step
    ofa_ufo.set_arch(supernet, arch)
    try:
        routed = _logits(supernet, inputs, routes(supernet, "vqa", "vqa", "vqa"))
    finally:
        ofa_ufo.set_arch(supernet, None)
    chip = ofa_ufo.extract_subnet(supernet, "vqa", arch=arch)
    assert (_logits(chip, inputs) - routed).abs().max() < 1e-5
    full = sum(p.numel() for p in ofa_ufo.extract_subnet(supernet, "vqa").get_encoder().supernet.parameters())
    if arch != largest_arch(supernet.config):
        assert sum(p.numel() for p in chip.get_encoder().supernet.parameters()) < full


def test_subnet_saves_loads_and_serves(supernet, processor, tmp_path):
    dense = ofa_ufo.extract_subnet(supernet, "caption", arch=smallest_arch(supernet.config))
    dense.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = ofa_ufo.OFAUFOForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.vision_config.supernet_task == "caption"
    image = (torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()
    assert "text" in pipeline("ofa-ufo", model=str(tmp_path))(image, task="caption", max_new_tokens=4)


def test_routed_supernet_serves_every_task_through_the_pipeline(supernet, processor, tmp_path):
    supernet.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = pipeline("ofa-ufo", model=str(tmp_path))
    image = (torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy()
    assert "boxes" in pipe(image, task="grounding", text="the dot")
    assert "label" in pipe(image, task="itm", text="a dot")


def test_bad_arch_and_task(supernet):
    with pytest.raises(ValueError, match=r"heads\[0\]=9 outside \[1, 4\]"):
        ofa_ufo.set_arch(supernet, ofa_ufo.SupernetArch(1, (9,), (32,)))
    with pytest.raises(ValueError, match="Unknown task 'segmentation'.*caption"):
        ofa_ufo.extract_subnet(supernet, "segmentation")
    untrained = tiny_model(vision_config=SUPERNET)
    with pytest.warns(UserWarning, match="never trained"):
        ofa_ufo.extract_subnet(untrained, "vqa")
    dense = ofa_ufo.extract_subnet(supernet, "vqa")
    with pytest.raises(ValueError, match="already an extracted subnet"):
        ofa_ufo.extract_subnet(dense, "vqa")


def test_subnet_checkpoint_into_supernet_config_is_a_clear_error(supernet, tmp_path):
    ofa_ufo.extract_subnet(supernet, "vqa").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="extracted subnet \\(task 'vqa'\\).*routed supernet"):
        ofa_ufo.OFAUFOForConditionalGeneration.from_pretrained(tmp_path, config=supernet.config)


def test_subnet_report_command(supernet, tmp_path, capsys):
    from ofa_ufo.deploy.subnet_report import main

    supernet.save_pretrained(tmp_path)
    main(["--model", str(tmp_path), "--repeats", "1"])
    table = capsys.readouterr().out
    assert "| supernet (routed, caption) |" in table and "| chip subnet caption (smallest arch) |" in table
    assert all(f"| subnet {task} |" in table for task in ofa_ufo.list_tasks())


def test_routers_learn_which_task_conflicts(tmp_path):
    """Four tasks on the same inputs; three share one target function, the fourth wants its negation.
    Only the FFN experts can tell tasks apart (task embeddings frozen at zero). The conflicting
    task's routers move to its own expert, the agreeing tasks' routers to the shared one."""
    SummaryWriter = pytest.importorskip("torch.utils.tensorboard").SummaryWriter
    from types import SimpleNamespace

    from ofa_ufo.deploy.subnets import log_router_probabilities, router_probabilities
    from ofa_ufo.layers.moe import TaskMoEFFN
    from ofa_ufo.models.ufo import UFOSupernet

    torch.manual_seed(0)
    tasks, dim = 4, 16
    vision = ofa_ufo.OFAUFOVisionConfig(supernet_layers=1, supernet_dim=dim, supernet_heads=2, supernet_head_dim=4,
                                        supernet_mlp_ratio=2.0, task_names=["caption", "vqa", "grounding", "face"])
    net, head, target_map = UFOSupernet(vision, dim, 4), torch.nn.Linear(dim, 4), torch.randn(dim, 4)
    ffn: TaskMoEFFN = net.blocks[0].ffn
    with torch.no_grad():
        ffn.experts.init_from(ffn.shared, lambda dst, src: dst.copy_(src))
        net.task_embed.weight.zero_()
    net.task_embed.weight.requires_grad_(False)
    others = [p for p in list(net.parameters()) + list(head.parameters()) if p.requires_grad and p is not ffn.router]
    optimizer = torch.optim.Adam([{"params": others, "lr": 3e-3}, {"params": [ffn.router], "lr": 3e-2}])
    holder = SimpleNamespace(get_encoder=lambda: SimpleNamespace(supernet=net),
                             config=SimpleNamespace(vision_config=vision))
    writer = SummaryWriter(tmp_path)
    for step in range(200):
        x, task_ids = torch.randn(8 * tasks, 4, dim), torch.arange(8 * tasks) % tasks
        sign = torch.where(task_ids == tasks - 1, -1.0, 1.0)[:, None]
        loss = ((head(net(x, torch.arange(1, 5), task_ids).mean(1)) - sign * (x.mean(1) @ target_map)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            log_router_probabilities(writer, holder, step)
    writer.close()
    own = [p[0] for p in router_probabilities(holder).values()]
    assert own[tasks - 1] > 0.9, own  # the conflicting task uses its own expert
    assert all(p < 0.1 for p in own[: tasks - 1]), own  # the agreeing tasks share
    assert any(tmp_path.iterdir())  # TensorBoard event file written


def test_training_samples_archs_per_step_with_sandwich(processor, tmp_path):
    """The trainer trains sample_arch(step) (+ largest and smallest with the sandwich rule)."""
    from ofa_ufo.training import TrainConfig, Trainer
    from ofa_ufo.training.trainer import step_archs

    model = tiny_model(vision_config={**SUPERNET, "supernet_sample_arch": True, "supernet_sandwich": True})
    archs = step_archs(model.config, 5)
    assert archs[0] == ofa_ufo.sample_arch(model.config, 5) and len(archs) == 3
    assert step_archs(tiny_model(vision_config=SUPERNET).config, 5) == [None]  # off by default
    before = {k: v.clone() for k, v in model.state_dict().items() if "router" in k}
    config = TrainConfig(tasks={"caption": 1.0, "vqa": 1.0, "grounding": 1.0}, batch_size=3, max_steps=2, lr=1e-3,
                         demo_train_scenes=8, eval_examples=0, output_dir=str(tmp_path))
    result = Trainer(config, resume="never", model=model, processor=processor).fit()
    assert len(result.losses) == 2 and all(loss > 0 for loss in result.losses)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert model.get_encoder().supernet.arch is None  # restored after each step


def test_locked_task_experts_train_only_the_shared_ffn():
    """`lock_to_shared`: every task runs the shared FFN alone (training and evaluation, no gradient to
    the experts or routers); `start_experts` copies it into each task's expert and zeroes the routers."""
    from ofa_ufo.layers.moe import TaskMoEFFN

    torch.manual_seed(0)
    ffn = TaskMoEFFN(num_tasks=3, dim=8, hidden=16)
    with torch.no_grad():
        ffn.shared.fc2.weight.normal_()
        ffn.experts.fc2_weight.normal_()  # experts differ from the shared FFN
    x, task_ids = torch.randn(4, 5, 8), torch.tensor([0, 2, 2, 1])
    ffn.lock_to_shared()
    assert all(ffn.locked(task) for task in range(3))
    torch.testing.assert_close(ffn.train()(x, task_ids), ffn.shared(x), rtol=0, atol=0)
    ffn(x, task_ids).sum().backward()
    assert ffn.router.grad is None and all(p.grad is None for p in ffn.experts.parameters())
    assert ffn.shared.fc1.weight.grad is not None
    torch.testing.assert_close(ffn.eval()(x, task_ids), ffn.shared(x), rtol=0, atol=0)

    ffn.start_experts()
    assert not any(ffn.locked(task) for task in range(3)) and not ffn.router.any()
    for task in range(3):
        torch.testing.assert_close(ffn.experts.fc1_weight[task], ffn.shared.fc1.weight, rtol=0, atol=0)
        torch.testing.assert_close(ffn.experts.fc2_bias[task], ffn.shared.fc2.bias, rtol=0, atol=0)
        assert ffn.uses_own_expert(task)  # tie -> own, which now computes what the shared FFN does
    torch.testing.assert_close(ffn.eval()(x, task_ids), ffn.shared(x), rtol=1e-6, atol=1e-6)
    ffn.train()(x, task_ids).sum().backward()
    assert ffn.router.grad is not None and ffn.router.grad[task_ids.unique()].abs().sum() > 0


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_trainer_starts_task_experts_after_their_share_of_steps(processor, tmp_path, capsys, share):
    """task_experts_from: the experts wait (locked on the shared FFN) for that share of the steps, then
    start; at 1.0 they never start and the saved supernet routes every task to the shared FFN."""
    from ofa_ufo.training import TrainConfig, Trainer

    model = tiny_model(vision_config=SUPERNET)
    experts = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k}
    config = TrainConfig(tasks={"caption": 1.0, "vqa": 1.0}, batch_size=2, max_steps=4, lr=1e-3,
                         demo_train_scenes=8, eval_examples=0, task_experts_from=share, output_dir=str(tmp_path))
    Trainer(config, resume="never", model=model, processor=processor).fit()
    ffns = [block.ffn for block in model.get_encoder().supernet.blocks]
    started = "step 2: task experts start as copies of the shared FFN" in capsys.readouterr().out
    unchanged = all(torch.equal(experts[k], v) for k, v in model.state_dict().items() if k in experts)
    if share == 1.0:
        assert not started and unchanged
        assert all(ffn.locked(task) for ffn in ffns for task in range(ffn.router.shape[0]))
    else:
        assert started and not unchanged
        assert not any(ffn.locked(0) for ffn in ffns) and all(ffn.router.abs().max() < 1 for ffn in ffns)


def test_task_experts_from_needs_a_routed_supernet(processor, tmp_path):
    from ofa_ufo.training import ConfigError, TrainConfig, Trainer, load_config

    with pytest.raises(ConfigError, match="task_experts_from.*share of max_steps"):
        load_config("pretrain_demo_tiny", ["task_experts_from=1.5"])
    config = TrainConfig(tasks={"caption": 1.0}, batch_size=2, max_steps=2, demo_train_scenes=4, eval_examples=0,
                         task_experts_from=0.5, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="task_experts_from.*needs a routed supernet"):
        Trainer(config, resume="never", model=tiny_model(), processor=processor)
