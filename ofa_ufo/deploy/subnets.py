"""Public UFO supernet API: sample elastic architectures and extract dense per-task subnets.

    arch = ofa_ufo.sample_arch(model.config, step=123)           # reproducible per step
    ofa_ufo.set_arch(model, arch)                                  # train / evaluate that subnet
    dense = ofa_ufo.extract_subnet(model, task="grounding")        # full-size task subnet
    chip = ofa_ufo.extract_subnet(model, task="grounding", arch=small_arch)   # a "chip" subnet
    shared = ofa_ufo.extract_subnet(model, task="shared")          # the shared path, for a new task
"""

from __future__ import annotations

import copy
import random
import warnings

import torch

from ofa_ufo.hf.configuration import OFAUFOConfig
from ofa_ufo.models.ufo import SupernetArch, UFOSupernet

# extract_subnet's name for the shared path: attention + the shared FFN in every block, no task expert
SHARED = "shared"

__all__ = [
    "SHARED", "SupernetArch", "elastic_choices", "extract_subnet", "get_supernet", "largest_arch", "log_router_probabilities",
    "router_probabilities", "sample_arch", "set_arch", "smallest_arch",
]


def get_supernet(model) -> UFOSupernet:
    """The model's UFO supernet, or a ValueError saying the model has none."""
    supernet = model.get_encoder().supernet
    if supernet is None:
        raise ValueError("this model has no UFO supernet (vision_config.supernet_layers is 0)")
    return supernet


def elastic_choices(config: OFAUFOConfig) -> tuple[list[int], list[float], list[int]]:
    """(head counts, MLP ratios, depths) the config lets a subnet take."""
    vision = config.vision_config
    return (vision.supernet_elastic_heads or [vision.supernet_heads],
            vision.supernet_elastic_mlp_ratios or [vision.supernet_mlp_ratio],
            vision.supernet_elastic_depths or [vision.supernet_layers])


def _arch(config: OFAUFOConfig, depth: int, heads: list[int], ratios: list[float]) -> SupernetArch:
    dim = config.vision_config.supernet_dim
    return SupernetArch(depth, tuple(heads), tuple(int(dim * r) for r in ratios))


def largest_arch(config: OFAUFOConfig) -> SupernetArch:
    heads, ratios, depths = elastic_choices(config)
    return _arch(config, max(depths), [max(heads)] * max(depths), [max(ratios)] * max(depths))


def smallest_arch(config: OFAUFOConfig) -> SupernetArch:
    heads, ratios, depths = elastic_choices(config)
    return _arch(config, min(depths), [min(heads)] * min(depths), [min(ratios)] * min(depths))


def sample_arch(config: OFAUFOConfig, step: int) -> SupernetArch:
    """A random subnet of the configured elastic ranges, seeded by the training step (the same on
    every rank): depth once, then heads and MLP ratio independently per block (UFO's recipe)."""
    rng = random.Random(step)
    heads, ratios, depths = elastic_choices(config)
    depth = rng.choice(depths)
    return _arch(config, depth, [rng.choice(heads) for _ in range(depth)], [rng.choice(ratios) for _ in range(depth)])


def set_arch(model, arch: SupernetArch | None) -> None:
    """Run the supernet as subnet `arch` (None: the largest) until changed; checked against the ranges."""
    supernet = get_supernet(model)
    if arch is not None:
        _check_arch(supernet, arch)
    supernet.arch = arch


def _check_arch(supernet: UFOSupernet, arch: SupernetArch) -> None:
    full = supernet.largest_arch()
    if not 1 <= arch.depth <= full.depth:
        raise ValueError(f"arch depth {arch.depth} outside [1, {full.depth}]")
    if len(arch.heads) < arch.depth or len(arch.hidden) < arch.depth:
        raise ValueError(f"arch needs heads and hidden for each of its {arch.depth} blocks, got {arch}")
    for i in range(arch.depth):
        if not 1 <= arch.heads[i] <= full.heads[i]:
            raise ValueError(f"arch heads[{i}]={arch.heads[i]} outside [1, {full.heads[i]}]")
        if not 1 <= arch.hidden[i] <= full.hidden[i]:
            raise ValueError(f"arch hidden[{i}]={arch.hidden[i]} outside [1, {full.hidden[i]}]")


def extract_subnet(model, task: str, arch: SupernetArch | None = None):
    """A dense `OFAUFOForConditionalGeneration` computing what the routed supernet computes for
    `task` under `arch`: no routers, only the expert each block routes `task` to, sliced dims.

    Everything outside the supernet is copied unchanged. The result saves with `save_pretrained`
    and serves `pipeline("ofa-ufo")`; its config records the task in `vision_config.supernet_task`
    and as its task vocabulary (`task_names`, the one route its single task embedding keeps).

    `task="shared"` (`SHARED`) keeps the path every task shares (UFO's fast task extension: fine-tune it
    on a task the supernet never trained): the shared FFN in every block, whatever the routers say, the
    mean of the task embeddings, and the supernet's whole task vocabulary (any of its tasks can train it).
    """
    supernet = get_supernet(model)
    if not supernet.routed:
        raise ValueError(f"this model is already an extracted subnet (task {model.config.vision_config.supernet_task!r})")
    index = None if task == SHARED else model.config.vision_config.route_id(task)
    arch = arch or supernet.arch or supernet.largest_arch()
    _check_arch(supernet, arch)
    if index is not None and all(float(b.ffn.router[index].detach().abs().max()) == 0.0
                                 for b in supernet.blocks[: arch.depth]):
        warnings.warn(f"the routers of task {task!r} were never trained: its subnet uses the untrained default route")
    dense = type(model)(_subnet_config(model.config, task, arch)).eval()
    state = {k: v for k, v in model.state_dict().items() if ".supernet." not in k}
    state.update(_subnet_state(supernet, index, arch, prefix=_supernet_prefix(model)))
    missing, unexpected = dense.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"subnet state mismatch: missing {missing}, unexpected {unexpected}")
    dense.tie_weights()
    return dense


def _supernet_prefix(model) -> str:
    return next(name for name, module in model.named_modules() if isinstance(module, UFOSupernet)) + "."


def _subnet_config(config: OFAUFOConfig, task: str, arch: SupernetArch) -> OFAUFOConfig:
    config = copy.deepcopy(config)
    vision = config.vision_config
    vision.supernet_layers, vision.supernet_routed, vision.supernet_num_tasks = arch.depth, False, 1
    if task != SHARED:  # the shared path keeps the supernet's task vocabulary
        vision.supernet_task, vision.task_names = task, [task]
    vision.supernet_layer_heads = list(arch.heads[: arch.depth])
    vision.supernet_layer_hidden = list(arch.hidden[: arch.depth])
    vision.supernet_heads = max(vision.supernet_layer_heads)
    vision.supernet_elastic_heads = vision.supernet_elastic_mlp_ratios = vision.supernet_elastic_depths = None
    vision.supernet_sample_arch = vision.supernet_sandwich = False
    return config


@torch.no_grad()
def _subnet_state(supernet: UFOSupernet, task: int | None, arch: SupernetArch, prefix: str) -> dict[str, torch.Tensor]:
    """Weights of the dense subnet: shared parts as they are, the task's embedding row (task None: the
    shared path, the mean row), per block the leading heads of attention and the routed expert (None:
    the shared one) cut to the arch's hidden width."""
    state = {f"{prefix}{k}": v for k, v in supernet.state_dict().items() if k.split(".")[0] in ("in_proj", "pos_embed", "norm")}
    embed = supernet.task_embed.weight
    state[f"{prefix}task_embed.weight"] = embed.mean(0, keepdim=True) if task is None else embed[task : task + 1]
    for i in range(arch.depth):
        block, heads, hidden = supernet.blocks[i], arch.heads[i], arch.hidden[i]
        out = f"{prefix}blocks.{i}."
        for norm in ("norm1", "norm2"):
            state[f"{out}{norm}.weight"], state[f"{out}{norm}.bias"] = getattr(block, norm).weight, getattr(block, norm).bias
        width = heads * block.attn.head_dim
        state[f"{out}attn.qkv.weight"], state[f"{out}attn.qkv.bias"] = block.attn.sliced_qkv(width)
        state[f"{out}attn.proj.weight"] = block.attn.proj.weight[:, :width]
        state[f"{out}attn.proj.bias"] = block.attn.proj.bias
        state.update({f"{out}ffn.{k}": v for k, v in _routed_expert(block.ffn, task, hidden).items()})
    return {k: v.clone().contiguous() for k, v in state.items()}


def _routed_expert(ffn, task: int | None, hidden: int) -> dict[str, torch.Tensor]:
    if task is not None and ffn.uses_own_expert(task):
        e = ffn.experts
        weights = (e.fc1_weight[task], e.fc1_bias[task], e.fc2_weight[task], e.fc2_bias[task])
    else:
        s = ffn.shared
        weights = (s.fc1.weight, s.fc1.bias, s.fc2.weight, s.fc2.bias)
    fc1_w, fc1_b, fc2_w, fc2_b = weights
    return {"fc1.weight": fc1_w[:hidden], "fc1.bias": fc1_b[:hidden], "fc2.weight": fc2_w[:, :hidden], "fc2.bias": fc2_b}


def router_probabilities(model) -> dict[str, list[float]]:
    """Per task of the model's vocabulary, the probability of routing to its own expert in each block
    (softmax of the logits)."""
    blocks, vision = get_supernet(model).blocks, model.config.vision_config
    with torch.no_grad():
        return {name: [float(b.ffn.router[vision.route_id(name)].softmax(-1)[1]) for b in blocks]
                for name in vision.task_names}


def log_router_probabilities(writer, model, step: int) -> None:
    """Write `router/<task>/block<i>` scalars to a TensorBoard `SummaryWriter`."""
    for task, probabilities in router_probabilities(model).items():
        for i, probability in enumerate(probabilities):
            writer.add_scalar(f"router/{task}/block{i}", probability, step)
