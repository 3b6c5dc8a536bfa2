"""``mimetic``: Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers" (ICML 2023). Data-free.

In the paper's row-vector notation (``x`` is a 1 x d token, ``x W``), per head ``W_q^h W_k^hᵀ ≈ α₁Z₁ + β₁I``
(``W_q^h, W_k^h`` are d x head_dim, a fresh ``Z₁`` per head) and per layer ``W_v W_proj ≈ α₂Z₂ − β₂I``
(``W_v, W_proj`` d x d, all heads together), ``Z`` with i.i.d. N(0, 1/d) entries. The factors come from the SVD
``A = U S Vᵀ``: ``W_q = U[:, :k] S^½``, ``W_k = V[:, :k] S^½`` (the best rank-k approximation, k = head_dim) and
``W_v = U S^½``, ``W_proj = S^½ Vᵀ`` (exact). Head h's value/projection slice holds singular components
``h*k .. (h+1)*k - 1``, so the heads' products sum to the layer target.

PyTorch stores ``out x in``, so in timm's fused ``qkv.weight`` (rows ``[q | k | v]``, head h at rows
``h*k .. (h+1)*k`` of each section) we write ``W_qᵀ`` and ``W_kᵀ``, and ``v`` rows = ``W_vᵀ``, ``proj.weight =
W_projᵀ``. Hence ``qkv.weight[q_h]ᵀ @ qkv.weight[k_h] ≈ α₁Z₁ + β₁I`` and ``(proj.weight @ qkv.weight[v])ᵀ =
α₂Z₂ − β₂I``. (A widely copied snippet writes ``U S^½`` straight into ``v`` rows, which makes the map
``S^½ Vᵀ U S^½`` instead of the target; we do not.) Biases, MLPs, norms and embeddings keep timm's init.
"""

from __future__ import annotations

import torch

from weit_core.models import ViTSpec, create_vit
from weit_core.strategies import InitResult, register
from weit_core.train import seed_everything


def mimetic_targets(spec: ViTSpec, seed: int = 0, alpha1: float = 0.7, beta1: float = 0.7, alpha2: float = 0.4,
                    beta2: float = 0.4) -> list[dict[str, torch.Tensor | list[torch.Tensor]]]:
    """Per block: ``qk`` = one d x d target per head, ``vo`` = the layer's d x d target (float64)."""
    d = spec.width
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(d, dtype=torch.float64)
    out = []
    for _ in range(spec.depth):
        qk = [alpha1 * torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5 + beta1 * eye
              for _ in range(spec.heads)]
        vo = alpha2 * torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5 - beta2 * eye
        out.append({"qk": qk, "vo": vo})
    return out


def factor(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L Rᵀ`` the best rank-``rank`` approximation of ``target`` (L, R: d x rank)."""
    u, s, vh = torch.linalg.svd(target)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


@torch.no_grad()
def apply_mimetic(model: torch.nn.Module, spec: ViTSpec, targets: list[dict]) -> None:
    d, k = spec.width, spec.width // spec.heads
    for blk, tgt in zip(model.blocks, targets, strict=True):
        w = blk.attn.qkv.weight
        for h, a in enumerate(tgt["qk"]):
            wq, wk = factor(a, k)
            w[h * k:(h + 1) * k] = wq.T.to(w.dtype)
            w[d + h * k:d + (h + 1) * k] = wk.T.to(w.dtype)
        wv, wp = factor(tgt["vo"], d)
        w[2 * d:] = wv.T.to(w.dtype)
        blk.attn.proj.weight.copy_(wp.to(w.dtype))  # W_proj = S^½ Vᵀ = wpᵀ (math); stored transposed: wp


@register("mimetic", families=("vit",))
def mimetic(
    spec: ViTSpec, *, seed: int = 0, init_mode: str = "", alpha1: float = 0.7, beta1: float = 0.7,
    alpha2: float = 0.4, beta2: float = 0.4, **_: object,
) -> InitResult:
    seed_everything(seed)
    model = create_vit(spec, init_mode, head_seed=seed)
    apply_mimetic(model, spec, mimetic_targets(spec, seed, alpha1, beta1, alpha2, beta2))
    return InitResult(model, {
        "source": "data_free", "alpha1": alpha1, "beta1": beta1, "alpha2": alpha2, "beta2": beta2,
        "z_distribution": "N(0, 1/d)", "qk": "per head: rank-head_dim SVD of alpha1*Z+beta1*I, fresh Z per head",
        "vo": "per layer: full SVD of alpha2*Z-beta2*I, head h = singular components h*hd..(h+1)*hd-1",
        "other_params": "timm init", "init_mode": init_mode or "timm_default",
    })
