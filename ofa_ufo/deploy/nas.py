"""Subnet search under a device budget (UFO's "One for All Chips", GP-NAS + a MAE-NAS-style score).

A trained supernet holds thousands of subnets (`SupernetArch`: depth, heads and FFN width per block).
Evaluating each is too slow, so, as UFO does with GP-NAS:

1. evaluate a few sampled archs (metric on held-out data, cost on the target),
2. fit Gaussian processes (scikit-learn) to metric and cost over an arch encoding,
3. predict every candidate, keep those under the budget, take the predicted Pareto front,
4. evaluate the front's best predicted pick and return it.

`search` takes the evaluation and the cost as callables, so the same loop serves any task, metric,
device target (`ofa_ufo.deploy.profiles`) or analytic budget (`params`, `flops`). `zero_shot_score`
ranks archs with no data and no labels (MAE-NAS: the log-std an untrained, Gaussian-initialised
network keeps through its layers), as a cheap optional ranker.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ofa_ufo.deploy.subnets import elastic_choices, get_supernet, largest_arch, smallest_arch
from ofa_ufo.hf.configuration import OFAUFOConfig
from ofa_ufo.models.ufo import SupernetArch

__all__ = [
    "ArchPredictor", "Evaluated", "SearchResult", "arch_from_dict", "arch_to_dict", "candidate_archs", "encode_arch",
    "kendall_tau", "pareto_front", "random_archs", "sample_archs", "search", "subnet_flops", "subnet_params",
    "zero_shot_score",
]

Budget = tuple[str, float]  # (kind, limit): ("latency_ms", 12.0), ("params", 2e6), ("flops", 1e8)
BUDGET_KINDS = ("latency_ms", "params", "flops")


def arch_to_dict(arch: SupernetArch) -> dict[str, Any]:
    return {"depth": arch.depth, "heads": list(arch.heads), "hidden": list(arch.hidden)}


def arch_from_dict(data: dict[str, Any]) -> SupernetArch:
    return SupernetArch(int(data["depth"]), tuple(int(h) for h in data["heads"]), tuple(int(h) for h in data["hidden"]))


def _space(config: OFAUFOConfig) -> tuple[list[int], list[int], list[int]]:
    """(depths, head counts, hidden widths) a block may take."""
    heads, ratios, depths = elastic_choices(config)
    dim = config.vision_config.supernet_dim
    return sorted(depths), sorted(heads), sorted({int(dim * r) for r in ratios})


def space_size(config: OFAUFOConfig) -> int:
    depths, heads, hidden = _space(config)
    return sum((len(heads) * len(hidden)) ** d for d in depths)


def random_archs(config: OFAUFOConfig, count: int, seed: int = 0, exclude: Sequence[SupernetArch] = ()) -> list[SupernetArch]:
    """`count` distinct archs drawn uniformly from the whole space (every arch equally likely, unlike
    training's `sample_arch`, which draws the depth first), none of them in `exclude`."""
    depths, heads, hidden = _space(config)
    total = space_size(config)
    if count > total - len(set(exclude)):
        raise ValueError(f"asked for {count} archs but the space holds {total} ({len(set(exclude))} excluded)")
    rng, seen, out = random.Random(seed), set(exclude), []
    weights = [(len(heads) * len(hidden)) ** d for d in depths]
    while len(out) < count:
        depth = rng.choices(depths, weights)[0]
        arch = SupernetArch(depth, tuple(rng.choice(heads) for _ in range(depth)),
                            tuple(rng.choice(hidden) for _ in range(depth)))
        if arch not in seen:
            seen.add(arch)
            out.append(arch)
    return out


def candidate_archs(config: OFAUFOConfig, limit: int = 20000, seed: int = 0) -> list[SupernetArch]:
    """Every arch of the space when it holds at most `limit`, else `limit` random ones."""
    if space_size(config) > limit:
        return random_archs(config, limit, seed)
    depths, heads, hidden = _space(config)
    per_block = list(itertools.product(heads, hidden))
    return [SupernetArch(d, tuple(h for h, _ in blocks), tuple(w for _, w in blocks))
            for d in depths for blocks in itertools.product(per_block, repeat=d)]


def encode_arch(config: OFAUFOConfig, arch: SupernetArch) -> np.ndarray:
    """Fixed-length features of an arch: depth share, then per block (heads, hidden) as shares of the
    largest, zeros for blocks past the depth. Shape (1 + 2 * max_depth,)."""
    full = largest_arch(config)
    features = [arch.depth / full.depth]
    for i in range(full.depth):
        active = i < arch.depth
        features += [arch.heads[i] / full.heads[i] if active else 0.0, arch.hidden[i] / full.hidden[i] if active else 0.0]
    return np.asarray(features, dtype=np.float64)


# ---- analytic costs ----------------------------------------------------------------------------

def _block_params(dim: int, head_dim: int, heads: int, hidden: int) -> int:
    width = heads * head_dim
    attention = dim * 3 * width + 3 * width + width * dim + dim
    ffn = dim * hidden + hidden + hidden * dim + dim
    return attention + ffn + 4 * dim  # + two LayerNorms


def subnet_params(config: OFAUFOConfig, arch: SupernetArch, fixed: int = 0) -> int:
    """Parameters of the supernet blocks an extracted subnet of `arch` keeps, plus `fixed` (everything
    else, counted once on a real extracted model)."""
    vision = config.vision_config
    return fixed + sum(_block_params(vision.supernet_dim, vision.supernet_head_dim, arch.heads[i], arch.hidden[i])
                       for i in range(arch.depth))


def subnet_flops(config: OFAUFOConfig, arch: SupernetArch, tokens: int, fixed: float = 0.0) -> float:
    """FLOPs (2 per multiply-add) of the supernet blocks of `arch` on `tokens` image tokens, plus `fixed`."""
    vision = config.vision_config
    dim, head_dim = vision.supernet_dim, vision.supernet_head_dim
    total = fixed
    for i in range(arch.depth):
        width = arch.heads[i] * head_dim
        linear = dim * 3 * width + width * dim + 2 * dim * arch.hidden[i]
        total += 2 * tokens * linear + 2 * 2 * tokens * tokens * width  # projections; QK^T and AV
    return float(total)


# ---- the predictor ------------------------------------------------------------------------------

class ArchPredictor:
    """GP-NAS as a scikit-learn Gaussian process: a linear trend (DotProduct, GP-NAS's linear mean) plus
    an RBF over the arch encoding for what the trend misses, plus observation noise."""

    def __init__(self, config: OFAUFOConfig, seed: int = 0):
        self.config, self.seed = config, seed
        self.model = None

    def fit(self, archs: Sequence[SupernetArch], values: Sequence[float]) -> ArchPredictor:
        from sklearn.exceptions import ConvergenceWarning  # the [search] extra: only the search needs scikit-learn
        from sklearn.gaussian_process import GaussianProcessRegressor  # (as above)
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, DotProduct, WhiteKernel  # (as above)

        if len(archs) < 3:
            raise ValueError(f"a predictor needs at least 3 evaluated archs, got {len(archs)}")
        features = np.stack([encode_arch(self.config, a) for a in archs])
        kernel = (DotProduct(sigma_0=1.0) + ConstantKernel(1.0) * RBF(np.ones(features.shape[1]), (1e-2, 1e2))
                  + WhiteKernel(1e-2, (1e-6, 1e1)))
        self.model = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=4, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a length scale at its bound = a feature that barely matters
            self.model.fit(features, np.asarray(values, dtype=np.float64))
        return self

    def predict(self, archs: Sequence[SupernetArch], return_std: bool = False):
        if self.model is None:
            raise RuntimeError("fit the predictor before predicting")
        features = np.stack([encode_arch(self.config, a) for a in archs])
        return self.model.predict(features, return_std=return_std)


def cross_validated_tau(config: OFAUFOConfig, archs: Sequence[SupernetArch], values: Sequence[float],
                        folds: int = 6, seed: int = 0) -> float:
    """Kendall tau between `values` and the predictions of GPs each fitted without the fold holding the
    arch (`folds`-fold, archs in the given order split round-robin): how well a predictor fitted on such
    samples ranks archs it has not seen, read from the samples alone. Near 0, the archs' values differ
    no more than their evaluation's noise (the GP fits noise as readily as signal, so its own noise
    estimate does not tell); 0 when there is nothing to rank (every value, or every prediction, equal)."""
    if len(archs) != len(values):
        raise ValueError(f"{len(archs)} archs but {len(values)} values")
    folds = min(folds, len(archs))
    if len(archs) - math.ceil(len(archs) / folds) < 3:
        raise ValueError(f"cross-validation needs at least 3 archs to fit per fold, got {len(archs)} archs "
                         f"in {folds} folds")
    predicted = np.zeros(len(archs))
    for fold in range(folds):
        held = [i for i in range(len(archs)) if i % folds == fold]
        kept = [i for i in range(len(archs)) if i % folds != fold]
        gp = ArchPredictor(config, seed).fit([archs[i] for i in kept], [values[i] for i in kept])
        predicted[held] = gp.predict([archs[i] for i in held])
    tau = kendall_tau(predicted, values)
    return 0.0 if math.isnan(tau) else tau


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Rank agreement of two score lists (tau-b: ties allowed), in [-1, 1]."""
    from scipy.stats import kendalltau  # comes with scikit-learn (the [search] extra)

    return float(kendalltau(a, b).statistic)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, metric) points no other point beats on both (lower cost, higher metric),
    ordered by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


# ---- zero-shot score ----------------------------------------------------------------------------

@torch.no_grad()
def zero_shot_score(model, arch: SupernetArch, tokens: int | None = None, batch: int = 8, repeats: int = 4,
                    seed: int = 0) -> float:
    """MAE-NAS's entropy score adapted to the ViT blocks: with every linear weight ~ N(0, 1), biases 0,
    norms and activations removed and a Gaussian input, sum the log-std each linear layer multiplies
    into the signal (rescaling to unit std after each), plus log(width); averaged over `repeats` fresh
    initialisations. No data and no labels: it ranks capacity, not what training taught."""
    supernet = get_supernet(model)
    dim = supernet.blocks[0].attn.qkv.in_features
    tokens = tokens or supernet.pos_embed.num_embeddings - 1
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(repeats):
        total = 0.0
        x = torch.randn(batch, tokens, dim, generator=generator)
        for i in range(arch.depth):
            block = supernet.blocks[i]
            head_dim, width, hidden = block.attn.head_dim, arch.heads[i] * block.attn.head_dim, arch.hidden[i]
            layers = {
                "qkv": torch.randn(3 * width, dim, generator=generator), "proj": torch.randn(dim, width, generator=generator),
                "fc1": torch.randn(hidden, dim, generator=generator), "fc2": torch.randn(dim, hidden, generator=generator),
            }
            qkv = F.linear(x, layers["qkv"])
            total += math.log(float(qkv.std()))
            q, k, v = (qkv / qkv.std()).view(batch, tokens, 3, arch.heads[i], head_dim).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
            for name, h in (("proj", attended), ("fc1", None), ("fc2", None)):
                h = x if h is None else h
                x = F.linear(h / h.std(), layers[name])
                total += math.log(float(x.std()))
            x = x / x.std()
        scores.append(total + math.log(dim))
    return float(np.mean(scores))


# ---- the search ---------------------------------------------------------------------------------

@dataclass
class Evaluated:
    """One arch with what was measured on it (and, for candidates, what was predicted)."""

    arch: SupernetArch
    metric: float | None = None
    cost: float | None = None
    predicted_metric: float | None = None
    predicted_cost: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "arch"}, "arch": arch_to_dict(self.arch)}


@dataclass
class SearchResult:
    pick: Evaluated
    budget: Budget
    samples: list[Evaluated]
    front: list[Evaluated]
    candidates: int
    predictor_fit: dict[str, float] = field(default_factory=dict)  # cross-validated taus of the predictors

    def to_dict(self) -> dict[str, Any]:
        return {"pick": self.pick.to_dict(), "budget": {self.budget[0]: self.budget[1]}, "candidates": self.candidates,
                "samples": [s.to_dict() for s in self.samples], "front": [f.to_dict() for f in self.front],
                "predictor_fit": self.predictor_fit}


def parse_budget(text: str) -> Budget:
    """"latency_ms=12.5" -> ("latency_ms", 12.5); the kind must be one of `BUDGET_KINDS`."""
    kind, sep, value = text.partition("=")
    if not sep or kind not in BUDGET_KINDS:
        raise ValueError(f"budget must be KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)}, got {text!r}")
    try:
        limit = float(value)
    except ValueError:
        raise ValueError(f"budget {text!r}: {value!r} is not a number") from None
    if limit <= 0:
        raise ValueError(f"budget {text!r} must be positive")
    return kind, limit


def sample_archs(config: OFAUFOConfig, samples: int, seed: int = 0) -> list[SupernetArch]:
    """The archs `search` evaluates to fit its predictors: the largest, the smallest, then random ones."""
    extremes = [largest_arch(config), smallest_arch(config)]
    return extremes + random_archs(config, samples - 2, seed, exclude=extremes)


def search(config: OFAUFOConfig, evaluate: Callable[[SupernetArch], float], cost: Callable[[SupernetArch], float],
           budget: Budget, samples: int = 24, predict_cost: bool = True, seed: int = 0,
           candidates: int = 20000, tries: int = 3, progress: bool = True) -> SearchResult:
    """Find the arch with the best predicted metric whose cost stays within `budget`.

    `evaluate(arch)` returns the held-out metric (higher is better) and `cost(arch)` the budget's
    quantity (latency measured on the target, or an analytic count). With `predict_cost` (measured
    latency) the costs are predicted by a second GP; analytic costs are computed for every candidate.
    The pick is evaluated; if its measured cost breaks the budget the next-best candidate is tried
    (at most `tries` times). Raises ValueError naming the smallest reachable cost when nothing fits.
    """
    kind, limit = budget
    if samples < 3:
        raise ValueError(f"samples must be at least 3 (largest, smallest and one random arch), got {samples}")
    sampled = sample_archs(config, samples, seed)
    evaluated = []
    for arch in tqdm(sampled, desc="evaluate sampled archs", unit="arch", disable=not progress):
        evaluated.append(Evaluated(arch, metric=float(evaluate(arch)), cost=float(cost(arch))))
    smallest_cost = min(e.cost for e in evaluated)
    if smallest_cost > limit and evaluated[1].cost > limit:
        raise ValueError(f"no arch meets {kind} <= {limit:g}: the smallest arch needs {evaluated[1].cost:.4g} "
                         f"(the lowest measured is {smallest_cost:.4g})")
    metric_gp = ArchPredictor(config, seed).fit([e.arch for e in evaluated], [e.metric for e in evaluated])
    cost_gp = ArchPredictor(config, seed).fit([e.arch for e in evaluated], [e.cost for e in evaluated]) if predict_cost else None
    pool = candidate_archs(config, candidates, seed)
    predicted_metric = metric_gp.predict(pool)
    predicted_cost = cost_gp.predict(pool) if cost_gp is not None else np.asarray([cost(a) for a in pool])
    inside = [i for i in range(len(pool)) if predicted_cost[i] <= limit]
    if not inside:
        raise ValueError(f"no arch is predicted to meet {kind} <= {limit:g}: the lowest predicted is "
                         f"{float(predicted_cost.min()):.4g} and the smallest arch measured {evaluated[1].cost:.4g}")
    front_index = pareto_front([(float(predicted_cost[i]), float(predicted_metric[i])) for i in inside])
    front = [Evaluated(pool[inside[j]], predicted_metric=float(predicted_metric[inside[j]]),
                       predicted_cost=float(predicted_cost[inside[j]])) for j in front_index]
    measured = {e.arch: e for e in evaluated}
    order = sorted(inside, key=lambda i: (-predicted_metric[i], predicted_cost[i]))
    pick = None
    for i in order[:tries]:
        arch = pool[i]
        known = measured.get(arch)
        pick = Evaluated(arch, known.metric if known else float(evaluate(arch)), known.cost if known else float(cost(arch)),
                         float(predicted_metric[i]), float(predicted_cost[i]))
        if pick.cost <= limit:
            break
    else:
        best = max((e for e in evaluated if e.cost <= limit), key=lambda e: e.metric, default=None)
        if best is None:
            raise ValueError(f"the {tries} best predicted archs all measured above {kind} <= {limit:g} "
                             f"(last: {pick.cost:.4g}); the smallest arch measured {evaluated[1].cost:.4g}")
        pick = copy.copy(best)
        pick.predicted_metric = float(metric_gp.predict([best.arch])[0])
        pick.predicted_cost = float(cost_gp.predict([best.arch])[0]) if cost_gp is not None else best.cost
    archs, fit = [e.arch for e in evaluated], {}
    if len(archs) > 3:  # each fold leaves at least 3 archs to fit on
        fit["metric_cv_tau"] = cross_validated_tau(config, archs, [e.metric for e in evaluated], seed=seed)
        if cost_gp is not None:
            fit["cost_cv_tau"] = cross_validated_tau(config, archs, [e.cost for e in evaluated], seed=seed)
    return SearchResult(pick, budget, evaluated, front, len(pool), fit)
