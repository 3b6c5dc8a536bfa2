"""``net2net``: Chen, Goodfellow & Shlens, "Net2Net: Accelerating Learning via Knowledge Transfer" (ICLR 2016),
carried over to pre-norm timm ViTs and to DiTs, growing a smaller ancestry.

Every widening is written as a pair of linear maps: an expansion ``E`` (new units = copies of old ones, each
row one-hot) applied to a layer's outputs and a left inverse ``P`` (``P E = I``: the outgoing weights of a
unit copied ``c`` times divided by ``c``) applied to the next layer's inputs — Net2WiderNet. Per target size:

* **depth** (Net2DeeperNet): new blocks are identities — timm-initialised, with ``attn.proj`` and ``mlp.fc2``
  weights and biases zeroed, so the pre-norm residual block adds nothing. ``depth_placement="interleave"``
  puts ancestry block ``i`` at ``i * L_t // L_a`` and the identities after it; ``"append"`` at the end. Exact.
* **MLP hidden** units: random mapping (units ``< h`` keep their index, each extra unit copies a uniformly
  drawn old unit); ``fc1`` rows copied, ``fc2`` columns divided by the copy count. GELU is elementwise: exact.
* **attention**: ``head_mode="copy"`` — extra heads copy a random old head, extra head dims copy a random old
  dim; ``k``/``v`` rows copied, ``q`` rows divided by the dim's copy count and multiplied by
  ``sqrt(hd_t / hd_a)`` (undoing timm's ``head_dim**-0.5``), ``proj`` columns divided by (head copies x dim
  copies). ``head_mode="zero"`` — extra heads keep timm's fresh q/k/v and get zero ``proj`` columns. Exact.
* **embedding width** (the residual stream, read only through LayerNorm in a pre-norm ViT) — the hard part:
  LayerNorm's mean and variance see every channel, so Net2Net's random mapping, which copies some channels
  more often than others, shifts both (``embed_mode="random"``, the paper's rule, any width: NOT function
  preserving). No copy-style map with unequal copy counts can keep them (a channel copied twice would need
  two scaled copies with ``a1 + a2 = a`` and ``a1² + a2² = a²``, i.e. one of them zero). Exact instead:
  ``"tile"`` (``D = q·d``: every channel copied ``q`` times; mean and variance unchanged) and ``"mean_pad"``
  (ours, after LEMON, Wang et al. ICLR 2024; any ``D = q·d + r``): the ``q`` copies hold
  ``mean + a·(x − mean)`` with ``a = sqrt(D / (q·d))`` and the ``r`` extra channels hold the mean, so the
  widened stream has the same mean and exactly the same variance (eps included); the next layer reads
  each copy with weight ``1 / (q·a)``, the LN shifts are scaled by ``a``, the extra channels normalise to 0.
  ``"auto"`` = tile when ``d`` divides ``D``, else mean_pad.
``noise > 0`` adds N(0, (noise·std W)²) to every inherited weight matrix (symmetry breaking; breaks exact
preservation by design). The classifier head is never copied for a task (``keep_head`` exists only for the
function-preservation check).

DiT (:func:`grow_dit`): the same attention and MLP rules; depth is easier (adaLN-Zero: a new block with zero
modulation has zero gates, the identity). The condition ``c`` has the residual width and is read through SiLU
(elementwise), so it is widened by the residual copies ``E`` (timestep MLP rows, hidden units copied the same
way, adaLN columns read with ``P``), and every adaLN's shift/scale/gate runs are copied by ``E`` row by row.
Only ``"tile"`` is exact: a gate multiplies each residual channel by its own scalar, which commutes with
copying channels but not with ``mean_pad``'s mean channels (refused); ``"auto"`` = tile when ``d`` divides
``D``, else ``"random"`` (not preserving, and ``info`` says so). The class table is the DiT's head: new.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from weit_core.models import DiTSpec, ViTSpec, create_dit, create_vit, family_of
from weit_core.strategies import InitResult, register
from weit_core.strategies._common import (
    ancestry_check,
    as_text,
    check_same_tokens,
    require_ancestry,
)
from weit_core.train import seed_everything

EMBED_MODES = ("auto", "tile", "mean_pad", "random")
HEAD_MODES = ("copy", "zero")
PLACEMENTS = ("interleave", "append")


def random_mapping(n_old: int, n_new: int, gen: torch.Generator) -> torch.Tensor:
    """Net2Net's mapping: unit ``j < n_old`` keeps ``j``, each extra unit copies a uniformly drawn old one."""
    return torch.cat([torch.arange(n_old), torch.randint(0, n_old, (n_new - n_old,), generator=gen)])


def _onehot(g: torch.Tensor, n_old: int) -> torch.Tensor:
    """``E`` (n_new x n_old) with ``E[j, g[j]] = 1``."""
    return torch.nn.functional.one_hot(g, n_old).double()


def _left_inverse(e: torch.Tensor) -> torch.Tensor:
    """``P`` (n_old x n_new): ``P[i, j] = 1 / (copies of i)`` where row ``j`` of ``e`` copies ``i``."""
    counts = e.sum(0)
    return e.T / counts.clamp(min=1)[:, None]


def residual_maps(d: int, big: int, mode: str, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``(E, P, Γ, B, mode)`` for the embedding width ``d -> big``: residual writes become ``E W``, reads (after
    a LayerNorm) ``W P``, LayerNorm gains ``Γ γ`` (1 on rows Γ leaves empty) and shifts ``B β``."""
    if mode == "auto":
        mode = "tile" if big % d == 0 else "mean_pad"
    if mode == "tile" and big % d:
        raise ValueError(f"embed_mode='tile' needs the target width to be a multiple of {d}, got {big}; "
                         "use 'mean_pad' or 'random'")
    if mode in ("tile", "mean_pad"):
        q, r = divmod(big, d)
        a = math.sqrt(big / (q * d))  # 1 for tile
        copies = _onehot(torch.arange(q * d) % d, d)
        gamma = torch.cat([copies, torch.zeros(r, d, dtype=torch.float64)])
        shift = gamma * a  # Ẽ: q scaled copies of every channel, r empty rows
        centre = torch.eye(d, dtype=torch.float64) - 1.0 / d
        e = shift @ centre + 1.0 / d  # x -> Ẽ(x - mean x) + mean x on every row
        p = torch.cat([copies.T / (q * a), torch.zeros(d, r, dtype=torch.float64)], 1)
        return e, p, gamma, shift, mode
    if mode == "random":
        e = _onehot(random_mapping(d, big, gen), d)
        return e, _left_inverse(e), e, e, mode
    raise ValueError(f"unknown embed_mode {mode!r}; choose one of {EMBED_MODES}")


def _attention_maps(src: ViTSpec, dst: ViTSpec, head_mode: str, gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over the flat attention width (head-major): ``Fq, Fkv`` (D x d) expand q and k/v rows, ``G`` (d x D)
    weights proj's input columns, ``new_rows`` marks rows of fresh heads (``zero`` mode)."""
    ha, hda, ht, hdt = src.heads, src.width // src.heads, dst.heads, dst.width // dst.heads
    if head_mode not in HEAD_MODES:
        raise ValueError(f"unknown head_mode {head_mode!r}; choose one of {HEAD_MODES}")
    gh = random_mapping(ha, ht, gen) if head_mode == "copy" else torch.arange(ht).clamp(max=ha - 1)
    fresh = torch.arange(ht) >= ha if head_mode == "zero" else torch.zeros(ht, dtype=torch.bool)
    gd = random_mapping(hda, hdt, gen)
    head_copies = torch.bincount(gh[~fresh], minlength=ha).double()
    dim_copies = torch.bincount(gd, minlength=hda).double()
    src_idx = (gh[:, None] * hda + gd[None, :]).reshape(-1)
    new_rows = fresh[:, None].expand(ht, hdt).reshape(-1)
    fkv = _onehot(src_idx, src.width)
    fkv[new_rows] = 0
    q_scale = math.sqrt(hdt / hda) / dim_copies[gd]
    fq = fkv * q_scale.repeat(ht)[:, None]
    g = fkv.T / (head_copies[gh][:, None] * dim_copies[gd][None, :]).reshape(-1).clamp(min=1)[None, :]
    return fq, fkv, g, new_rows


def _shrinks(src: ViTSpec, dst: ViTSpec) -> list[str]:
    """The axes on which ``dst`` is smaller than ``src`` (net2net grows every axis or keeps it)."""
    hda, hdt = src.width // src.heads, dst.width // dst.heads
    return [f"{k} {a} -> {b}" for k, a, b in (("depth", src.depth, dst.depth), ("width", src.width, dst.width),
                                               ("heads", src.heads, dst.heads), ("head_dim", hda, hdt),
                                               ("mlp hidden", src.hidden, dst.hidden)) if b < a]


def _check_growth(src: ViTSpec, dst: ViTSpec) -> None:
    hda = src.width // src.heads
    shrink = _shrinks(src, dst)
    if shrink:
        ok = [h for h in range(src.heads, dst.width + 1) if dst.width % h == 0 and dst.width // h >= hda]
        raise ValueError(f"net2net only grows, but {', '.join(shrink)}; use weight_selection to shrink"
                         + (f" (heads that grow from this ancestry at width {dst.width}: {ok})" if ok else ""))


def _places(src: ViTSpec, dst: ViTSpec, depth_placement: str) -> list[int]:
    """The target block each ancestry block lands at; the others are identities."""
    if depth_placement == "interleave":
        return [i * dst.depth // src.depth for i in range(src.depth)]
    if depth_placement == "append":
        return list(range(src.depth))
    raise ValueError(f"unknown depth_placement {depth_placement!r}; choose one of {PLACEMENTS}")


def _grow_sublayers(sd: dict, own: dict, new: dict, a: str, b: str, src: ViTSpec, dst: ViTSpec, e: torch.Tensor,
                    p: torch.Tensor, head_mode: str, noise: float, gen: torch.Generator) -> None:
    """Ancestry block ``a``'s attention and MLP into target block ``b`` (prefixes): inputs read through ``p``,
    residual writes through ``e``, heads and MLP units widened by copying."""
    d = src.width
    fq, fkv, g, fresh = _attention_maps(src, dst, head_mode, gen)
    wqkv, bqkv = sd[a + "attn.qkv.weight"], sd[a + "attn.qkv.bias"]
    maps = (fq, fkv, fkv)
    w = torch.cat([maps[s] @ wqkv[s * d:(s + 1) * d] @ p for s in range(3)])
    bias = torch.cat([maps[s] @ bqkv[s * d:(s + 1) * d] for s in range(3)])
    if fresh.any():  # zero mode: fresh heads keep the init's q/k/v rows
        rows = torch.cat([fresh] * 3)
        w[rows] = own[b + "attn.qkv.weight"].double()[rows]
        bias[rows] = own[b + "attn.qkv.bias"].double()[rows]
    new[b + "attn.qkv.weight"], new[b + "attn.qkv.bias"] = w, bias
    new[b + "attn.proj.weight"] = e @ sd[a + "attn.proj.weight"] @ g
    new[b + "attn.proj.bias"] = e @ sd[a + "attn.proj.bias"]
    fh = _onehot(random_mapping(src.hidden, dst.hidden, gen), src.hidden)
    new[b + "mlp.fc1.weight"] = fh @ sd[a + "mlp.fc1.weight"] @ p
    new[b + "mlp.fc1.bias"] = fh @ sd[a + "mlp.fc1.bias"]
    new[b + "mlp.fc2.weight"] = e @ sd[a + "mlp.fc2.weight"] @ _left_inverse(fh)
    new[b + "mlp.fc2.bias"] = e @ sd[a + "mlp.fc2.bias"]
    if noise > 0:
        for k in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
            w = new[b + k]
            new[b + k] = w + noise * w.std() * torch.randn(w.shape, generator=gen, dtype=torch.float64)


def _start(ancestry: nn.Module, src: ViTSpec, dst: ViTSpec, build, seed: int, init_mode: str) -> tuple:
    """The checks, the ``dst`` model built after ``seed_everything(seed)``, the generator of every random
    mapping, and the ancestry's tensors in float64 (the maps are exact there)."""
    check_same_tokens("net2net", src, dst)
    _check_growth(src, dst)
    seed_everything(seed)
    model = build(dst, init_mode, head_seed=seed)
    sd = {k: v.detach().double().cpu() for k, v in ancestry.state_dict().items()}
    return model, torch.Generator().manual_seed(seed), sd


def _info(src: ViTSpec, dst: ViTSpec, places: list[int], embed_mode: str, exact: str, noise: float,
          **extra: object) -> dict:
    return {
        "source": "ancestry", "embed_mode": embed_mode, "noise": noise,
        "ancestry_blocks_at": as_text(torch.tensor(places)),
        "function_preserving": "no (noise)" if noise > 0 else exact if src.width != dst.width else "exact",
        "ancestry_depth": src.depth, "ancestry_width": src.width, "ancestry_heads": src.heads,
        "ancestry_hidden": src.hidden, **extra,
    }


@torch.no_grad()
def grow_vit(
    ancestry: nn.Module, src: ViTSpec, dst: ViTSpec, *, seed: int = 0, init_mode: str = "", noise: float = 0.0,
    embed_mode: str = "auto", head_mode: str = "copy", depth_placement: str = "interleave", keep_head: bool = False,
) -> tuple[nn.Module, dict]:
    """A ``dst``-sized timm ViT grown from ``ancestry``; ``keep_head=True`` also maps the classifier (checks only)."""
    model, gen, sd = _start(ancestry, src, dst, create_vit, seed, init_mode)
    places = _places(src, dst, depth_placement)
    own = model.state_dict()
    e, p, gmap, bmap, embed_mode = residual_maps(src.width, dst.width, embed_mode, gen)
    empty = gmap.sum(1) == 0  # mean_pad's extra channels: LayerNorm output 0 there, gain 1

    def ln(prefix_src: str, prefix_dst: str) -> None:
        gamma = gmap @ sd[prefix_src + ".weight"]
        gamma[empty] = 1.0
        new[prefix_dst + ".weight"], new[prefix_dst + ".bias"] = gamma, bmap @ sd[prefix_src + ".bias"]

    new: dict[str, torch.Tensor] = {
        "cls_token": sd["cls_token"] @ e.T, "pos_embed": sd["pos_embed"] @ e.T,
        "patch_embed.proj.weight": torch.einsum("Dd,d...->D...", e, sd["patch_embed.proj.weight"]),
        "patch_embed.proj.bias": e @ sd["patch_embed.proj.bias"],
    }
    ln("norm", "norm")
    if keep_head:
        new["head.weight"], new["head.bias"] = sd["head.weight"] @ p, sd["head.bias"]
    for t in set(range(dst.depth)) - set(places):  # identity blocks: zero every write into the residual
        for k in ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            new[f"blocks.{t}.{k}"] = torch.zeros_like(own[f"blocks.{t}.{k}"], dtype=torch.float64)
    for i, t in enumerate(places):
        a, b = f"blocks.{i}.", f"blocks.{t}."
        ln(a + "norm1", b + "norm1")
        ln(a + "norm2", b + "norm2")
        _grow_sublayers(sd, own, new, a, b, src, dst, e, p, head_mode, noise, gen)
    for k, v in new.items():
        own[k].copy_(v)
    exact = {"tile": "exact", "mean_pad": "exact", "random": "no (LayerNorm statistics shift)"}[embed_mode]
    return model, _info(src, dst, places, embed_mode, exact, noise, head_mode=head_mode,
                        depth_placement=depth_placement,
                        classifier_head="mapped (check only)" if keep_head else "new (timm init)",
                        init_mode=init_mode or "timm_default")


@torch.no_grad()
def grow_dit(
    ancestry: nn.Module, src: DiTSpec, dst: DiTSpec, *, seed: int = 0, init_mode: str = "", noise: float = 0.0,
    embed_mode: str = "auto", head_mode: str = "copy", depth_placement: str = "interleave", keep_head: bool = False,
) -> tuple[nn.Module, dict]:
    """A ``dst``-sized DiT grown from ``ancestry``: the ViT's block rules, with ``E`` also on the condition ``c``
    and on every adaLN's rows (six runs; the final layer's two). ``keep_head=True`` maps the class table
    (checks only; ancestry and target must then share the class count)."""
    if embed_mode == "mean_pad":
        raise ValueError("embed_mode='mean_pad' cannot preserve a DiT (its per-channel gates do not commute with "
                         "the mean channels); use 'tile' (a width multiple of the ancestry's) or 'random'")
    model, gen, sd = _start(ancestry, src, dst, create_dit, seed, init_mode)
    places = _places(src, dst, depth_placement)
    own = model.state_dict()
    if embed_mode == "auto":
        embed_mode = "tile" if dst.width % src.width == 0 else "random"
    e, p, _, _, embed_mode = residual_maps(src.width, dst.width, embed_mode, gen)  # one-hot: copies of channels

    def runs(w: torch.Tensor, n: int) -> torch.Tensor:  # n chunks of d rows, each copied by e
        return torch.cat([e @ chunk for chunk in w.chunk(n)])

    new: dict[str, torch.Tensor] = {
        "pos_embed": sd["pos_embed"] @ e.T, "x_embedder.proj.bias": e @ sd["x_embedder.proj.bias"],
        "x_embedder.proj.weight": torch.einsum("Dd,d...->D...", e, sd["x_embedder.proj.weight"]),
        "t_embedder.mlp.0.weight": e @ sd["t_embedder.mlp.0.weight"],  # hidden units: copies, as the residual
        "t_embedder.mlp.0.bias": e @ sd["t_embedder.mlp.0.bias"],
        "t_embedder.mlp.2.weight": e @ sd["t_embedder.mlp.2.weight"] @ p,
        "t_embedder.mlp.2.bias": e @ sd["t_embedder.mlp.2.bias"],
        "final_layer.adaLN_modulation.1.weight": runs(sd["final_layer.adaLN_modulation.1.weight"], 2) @ p,
        "final_layer.adaLN_modulation.1.bias": runs(sd["final_layer.adaLN_modulation.1.bias"], 2),
        "final_layer.linear.weight": sd["final_layer.linear.weight"] @ p,
        "final_layer.linear.bias": sd["final_layer.linear.bias"],
    }
    if keep_head:
        new["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"] @ e.T
    for t in set(range(dst.depth)) - set(places):  # identity blocks: adaLN-Zero, every gate 0
        for k in ("weight", "bias"):
            new[f"blocks.{t}.adaLN_modulation.1.{k}"] = torch.zeros_like(own[f"blocks.{t}.adaLN_modulation.1.{k}"],
                                                                          dtype=torch.float64)
    for i, t in enumerate(places):
        a, b = f"blocks.{i}.", f"blocks.{t}."
        new[b + "adaLN_modulation.1.weight"] = runs(sd[a + "adaLN_modulation.1.weight"], 6) @ p
        new[b + "adaLN_modulation.1.bias"] = runs(sd[a + "adaLN_modulation.1.bias"], 6)
        _grow_sublayers(sd, own, new, a, b, src, dst, e, p, head_mode, noise, gen)
    for k, v in new.items():
        own[k].copy_(v)
    exact = "exact" if embed_mode == "tile" else "no (LayerNorm statistics shift)"
    return model, _info(src, dst, places, embed_mode, exact, noise, head_mode=head_mode,
                        depth_placement=depth_placement,
                        class_table="mapped (check only)" if keep_head else "new (HEAD_STREAM + seed)",
                        init_mode=init_mode or "default")


@register("net2net", needs=("ancestry",), families=("vit", "dit"),
          check=ancestry_check(lambda src, dst: "smaller_than_ancestry" if _shrinks(src, dst) else None))
def net2net(
    spec: ViTSpec | DiTSpec, *, ancestry: nn.Module | None = None, ancestry_spec: ViTSpec | DiTSpec | None = None,
    seed: int = 0, init_mode: str = "", noise: float = 0.0, embed_mode: str = "auto", head_mode: str = "copy",
    depth_placement: str = "interleave", **_: object,
) -> InitResult:
    ancestry, src = require_ancestry("net2net", ancestry, ancestry_spec, family=family_of(spec))
    grow = grow_dit if isinstance(spec, DiTSpec) else grow_vit
    model, info = grow(ancestry, src, spec, seed=seed, init_mode=init_mode, noise=noise, embed_mode=embed_mode,
                       head_mode=head_mode, depth_placement=depth_placement)
    return InitResult(model, info)
