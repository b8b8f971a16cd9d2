"""`add_weighted_adapter`: a new adapter made from weighted existing ones, with PEFT's combination types.

Each LoRA layer holding any of the source adapters gets the new adapter; its (A, B) come from the sources':

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine the A matrices and the B
  matrices separately (same rank needed), each source weighted by ``√|w·s|`` (the sign of ``w·s`` on A only),
  where ``s`` is the source's scaling. Cheap, and only an approximation of the weighted sum of the updates: the
  cross terms ``B_i A_j`` of different sources are in the product.
- ``cat`` stacks the sources: ``A = [w₁s₁A₁; w₂s₂A₂; …]``, ``B = [B₁ B₂ …]``, rank Σ rᵢ, so ``B A = Σ wᵢsᵢBᵢAᵢ``
  exactly.
- ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``) combine the full
  updates ``ΔWᵢ = sᵢ BᵢAᵢ`` and keep the best rank-``svd_rank`` approximation of the result (``B = U S``,
  ``A = Vᴴ``).

The new adapter has ``lora_alpha = r`` (scaling 1: the sources' scalings are inside its weights), the union of the
sources' targets, and is added inactive (``set_adapter`` to use it). Results equal ``peft``'s
``add_weighted_adapter`` (tested; DARE's random masks are equal given the same random draws).

The pruning methods (papers): TIES-merging https://arxiv.org/abs/2306.01708 (trim to the ``density`` largest
magnitudes, elect a sign per entry, average the entries that agree with it), DARE https://arxiv.org/abs/2311.03099
(keep each entry with probability ``density`` and rescale by ``1/density``).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .adapters import set_adapter
from .config import LoraConfig
from .inject import adapter_configs, add_adapter, lora_layers
from .modules_to_save import ModulesToSave
from . import registry
from .targets import DEFAULT_TARGETS, expanded_target_modules

__all__ = ["add_weighted_adapter", "COMBINATION_TYPES"]

_FACTORED = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
#: Every ``combination_type`` accepted (PEFT's names).
COMBINATION_TYPES = (*_FACTORED, "cat", *_SVD)
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total", generator: torch.Generator | None = None) -> nn.Module:
    """Add adapter ``adapter_name`` combining ``adapters`` with ``weights`` (PEFT's method of the same name).

    Args:
        model: a model holding the source adapters; the new adapter is added (inactive) and ``model`` returned.
        adapters: names of the adapters to combine.
        weights: one weight per adapter (negative weights subtract).
        adapter_name: the new adapter's name.
        combination_type: one of :data:`COMBINATION_TYPES`; see the module notes. ``svd`` (PEFT's default) and
            ``cat`` reproduce ``Σ wᵢΔWᵢ`` (``svd`` up to its rank); the factored types are cheaper approximations.
            With one source adapter every type is ``linear``, as in PEFT.
        svd_rank: rank of an ``*svd`` result (default: the largest source rank).
        svd_clamp: quantile at which the SVD factors are clamped (None: no clamping).
        svd_full_matrices, svd_driver: passed to ``torch.linalg.svd``.
        density: fraction of entries kept by the pruning types (ties, dare_*, magnitude_prune*), in [0, 1].
        majority_sign_method: ``"total"`` (sign of the sum) or ``"frequency"`` (most frequent sign) for TIES.
        generator: random generator for DARE's masks (default: torch's global one).

    Raises:
        ValueError: for an unknown or duplicate name, a weight count that is not one per adapter, an unknown
            combination type, a missing or out-of-range ``density``, ranks that differ where the type needs one
            rank, mixed ``target_modules`` kinds, or sources with ``modules_to_save`` (whole modules cannot be
            weighted).
    """
    configs = adapter_configs(model)
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check_arguments(model, configs, adapters, weights, adapter_name, combination_type, density, majority_sign_method)
    if len(adapters) == 1:
        combination_type = "linear"  # as PEFT: a single adapter is only reweighted
    ranks = [_max_rank(configs[name]) for name in adapters]
    if combination_type in _FACTORED:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type={combination_type!r} needs adapters of one rank, got "
                             f"{dict(zip(adapters, ranks))}; use 'cat' or 'svd' for different ranks")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
            raise ValueError(f"svd_rank={svd_rank!r} must be a positive integer (or None for the largest source rank)")
        new_rank = svd_rank or max(ranks)

    config = copy.deepcopy(configs[adapters[0]])
    config.r, config.lora_alpha = new_rank, new_rank
    config.rank_pattern, config.alpha_pattern = {}, {}
    config.use_rslora = False  # scaling exactly 1: the sources' scalings are in the combined weights
    config.init_lora_weights = True  # never re-run OLoRA/PiSSA on the base
    config.target_modules = _union_targets(model, configs, adapters)
    holders = {path for path, layer in lora_layers(model).items() if any(a in layer.lora_A for a in adapters)}
    active = list(registry.active_names(model))
    first = next(layer for layer in lora_layers(model).values() if adapters[0] in layer.lora_A)
    add_adapter(model, config, adapter_name, dtype=first.lora_A[adapters[0]].weight.dtype)
    created = {path for path, layer in lora_layers(model).items() if adapter_name in layer.lora_A}
    if created != holders:
        from .adapters import delete_adapter

        delete_adapter(model, adapter_name)
        set_adapter(model, active)
        odd = sorted(created ^ holders)[:3]
        raise ValueError(f"the combined targets do not select the layers the adapters {adapters} are on (e.g. {odd}); "
                         "their exclude_modules / layers_to_transform differ; combine adapters with the same ones")

    with torch.no_grad():
        for layer in lora_layers(model).values():
            if adapter_name not in layer.lora_A:
                continue
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
            target_A, target_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if combination_type == "cat":
                A, B = _cat(layer, present)
                target_A.zero_(), target_B.zero_()
                target_A[: A.shape[0]] = A.to(target_A.dtype)
                target_B[:, : B.shape[1]] = B.to(target_B.dtype)
            elif combination_type in _SVD:
                A, B = _svd(layer, present, combination_type, new_rank, density, majority_sign_method, svd_clamp,
                            svd_full_matrices, svd_driver, generator)
                target_A.copy_(A.to(target_A.dtype)), target_B.copy_(B.to(target_B.dtype))
            else:
                A, B = _factored(layer, present, combination_type, density, majority_sign_method, generator)
                target_A.copy_(A), target_B.copy_(B)
    set_adapter(model, active)  # the new adapter stays inactive; trainable flags follow the active set
    return model


# --- checks


def _check_arguments(model, configs, adapters, weights, adapter_name, combination_type, density, sign_method) -> None:
    if not adapters:
        raise ValueError("adapters=[] names no adapter to combine")
    for name in adapters:
        if name not in configs:
            raise ValueError(f"unknown adapter {name!r}; this model has {sorted(configs)}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters={adapters} names an adapter twice; give each once with its summed weight")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights={weights} must be finite numbers")
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter(model, {adapter_name!r}) first "
                         "or pick another name")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r}; use one of {list(COMBINATION_TYPES)}")
    base_type = combination_type.removesuffix("_svd")
    if len(adapters) > 1 and base_type in _NEEDS_DENSITY:
        if density is None or not 0.0 <= float(density) <= 1.0:
            raise ValueError(f"combination_type={combination_type!r} needs density in [0, 1] (the fraction of "
                             f"entries kept), got density={density!r}")
    if sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={sign_method!r}; use 'total' or 'frequency'")
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            trained = [a for a in adapters if a in module.modules_to_save]
            if trained:
                raise ValueError(f"adapters {trained} train the whole module {path!r} (modules_to_save), which cannot "
                                 "be weighted; combine adapters without modules_to_save")


def _max_rank(config: LoraConfig) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _union_targets(model: nn.Module, configs: dict[str, LoraConfig], adapters: list[str]) -> list[str] | str:
    """The sources' targets together: a regex alternation of regexes, or the union of the (expanded) lists."""
    specs = []
    for name in adapters:
        spec = configs[name].target_modules
        if spec is None:
            spec = list(DEFAULT_TARGETS)
        elif spec == "all-linear" or spec == ["all-linear"]:
            spec = expanded_target_modules(model, name)
        specs.append(spec)
    if all(isinstance(s, str) for s in specs):
        return "|".join(f"({s})" for s in specs)
    if any(isinstance(s, str) for s in specs):
        raise ValueError(f"adapters {adapters} mix regex and list target_modules "
                         f"({[configs[a].target_modules for a in adapters]}); combine adapters of one kind")
    return sorted(set().union(*specs))


# --- per-layer arithmetic (float32, cast to the adapter dtype at the end)


def _cat(layer, present) -> tuple[torch.Tensor, torch.Tensor]:
    As = [layer.lora_A[a].weight * w * layer.scaling[a] for a, w in present]
    Bs = [layer.lora_B[a].weight for a, _ in present]
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def _factored(layer, present, kind, density, sign_method, generator) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = layer.lora_A[present[0][0]].weight.dtype
    signed, unsigned = [], []
    for name, w in present:
        ws = w * layer.scaling[name]
        root = math.sqrt(abs(ws))
        signed.append(root if ws >= 0 else -root)  # the sign goes on A only, so B A keeps it
        unsigned.append(root)
    A = _combine(kind, [layer.lora_A[a].weight for a, _ in present], torch.tensor(signed), density, sign_method,
                 generator)
    B = _combine(kind, [layer.lora_B[a].weight for a, _ in present], torch.tensor(unsigned), density, sign_method,
                 generator)
    return A.to(dtype), B.to(dtype)


def _svd(layer, present, kind, rank, density, sign_method, clamp, full_matrices, driver, generator
         ) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [layer.lora_B[a].weight @ layer.lora_A[a].weight * layer.scaling[a] for a, _ in present]  # (out, in)
    deltas = [d if d.dtype in (torch.float32, torch.float64) else d.float() for d in deltas]  # no 16-bit SVD on CPU
    if rank > min(deltas[0].shape):
        raise ValueError(f"svd_rank={rank} exceeds the smaller dimension {min(deltas[0].shape)} of a layer of shape "
                         f"{tuple(deltas[0].shape)}; pass a smaller svd_rank")
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    delta = _combine("linear" if kind == "svd" else kind.removesuffix("_svd"), deltas, weights, density, sign_method,
                     generator)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    B = U[:, :rank] @ torch.diag(S[:rank])  # (out, rank)
    A = Vh[:rank, :]  # (rank, in)
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return A, B


def _combine(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density, sign_method, generator
             ) -> torch.Tensor:
    """One weighted combination of same-shape tensors (``weights``: one per tensor)."""
    if kind in ("magnitude_prune", "ties"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_keep_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (n, *shape)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    # TIES: per entry, the sign the sources agree on (elected from the unweighted, trimmed tensors), and the mean
    # of the weighted entries having that sign.
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1, -1)
    agree = signs == elected
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density · numel)`` largest-magnitude entries zeroed."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * keep.view(t.shape)


def _keep_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` and divided by it (expectation unchanged)."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density
