"""CogVLA-mini: CogVLA's vision tower and its Llama decoder with LFP, in one readable file.

"The source" is the document on CogVLA's LFP that this file follows; "the reference code" is the
public CogVLA code, which grew out of p-MoD, followed where the source is silent.

LFP (layer-wise feature pruning) lets some decoder layers run on fewer tokens, in six phases:
(1) a router scores every token; (2) the layer keeps the most probable vision tokens and every
other token (K in all); (3) it gathers them; (4) it runs a normal Llama block on them, its MLP
output scaled by the router's keep probability (the only path by which the loss reaches the
router); (5) it scatters the results back, the dropped tokens unchanged; (6) the next layer sees
all N tokens again.

The sequence the LLM sees (the source's layout, every count a config field):

    [BOS] [192 vision] [20 text] [3 state + 40 action queries]   = 256 tokens
      0      1..192     193..212          213..255

Read it top to bottom: config, Llama pieces, LFP, decoder, vision tower, CogVLA, accounting,
and the walkthrough that `python cogvla_mini.py` runs.

Shape legend (used in the comments at the end of lines):
    B batch          N tokens in the LLM sequence      K tokens kept by an LFP layer
    D d_model        H attention heads                 Hkv key/value heads (GQA)
    Dh head dim      F MLP hidden size                 V vision tokens (I x G)
    T text tokens    S state tokens                    Q action queries (chunk x action dim)
    I camera images  P patches per image               G tokens per image (aggregation or P)
    Dv ViT width     B' images in a batch (B x I), as the ViT sees them
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat


# %% Config ====================================================================================

def need(ok: bool, expected: str, got):
    """Fail loudly at the boundary, saying what was expected and what came."""
    if not ok:
        raise ValueError(f"{expected}, got {got}")


@dataclass
class CogVLAConfig:
    # --- the Llama decoder ---
    vocab_size: int = 256           # token ids are 0..vocab_size-1
    d_model: int = 64               # D, the LLM's width
    n_layers: int = 32              # decoder layers
    n_heads: int = 4                # H, query heads
    n_kv_heads: int = 2             # Hkv, key/value heads (GQA when < n_heads)
    d_ff: int = 172                 # F, SwiGLU hidden size
    rope_theta: float = 10000.0     # RoPE base
    rms_eps: float = 1e-5           # RMSNorm epsilon (Llama-2's value)
    attn_impl: str = "math"         # "math" (its softmax a line to stop on), "sdpa", "sdpa_causal"
    mask_kind: str = "causal"       # "causal" (the source) or "catten" (action segment both ways)
    # --- the sequence layout ---
    n_images: int = 3               # I, camera images per sample
    n_agg_tokens: int = 64          # G, aggregation tokens per image; 0 = the ViT's patch tokens
    n_text: int = 20                # T, instruction tokens (padded/truncated to this)
    n_state: int = 3                # proprioceptive state values, one token each
    chunk_len: int = 10             # predicted action steps
    action_dim: int = 4             # values per action step (dx, dy, dz, gripper)
    bos_id: int = 1                 # the BOS token id
    # --- the vision tower ---
    image_size: int = 28            # square images, pixels
    patch_size: int = 7             # ViT patch size, pixels
    dino_width: int = 32            # DINOv2-like encoder width
    dino_depth: int = 2             # its blocks that run (the output is read after the last)
    dino_heads: int = 2             # its attention heads
    siglip_width: int = 48          # SigLIP-like encoder width
    siglip_depth: int = 2           # its blocks that run
    siglip_heads: int = 2           # its attention heads
    vit_mlp_ratio: float = 4.0      # ViT MLP hidden = ratio x width
    # --- LFP ---
    schedule: str | dict = "source"  # "source", "shifted{cos,linear}_decay_<max>_<min>" or {l: r}
    lfp_average: float = 0.5        # the shifted schedules' average ratio (the reference's 0.5)
    router_film: bool = True        # FiLM the vision tokens with the text before the router scores
    position_mode: str = "reindex"  # kept tokens at 0..K-1 ("reindex") or as they were ("original")
    # --- checks: each reads a value back to the host, which makes a GPU wait ---
    check_values: bool = True       # ids in range, finite images and state, finite LFP outputs

    @classmethod
    def tiny(cls, **overrides) -> "CogVLAConfig":
        """The source's layout and schedule (32 layers, LFP at 5..30, 192/20/43 tokens), tiny."""
        return cls(**overrides)

    @classmethod
    def full(cls, **overrides) -> "CogVLAConfig":
        """The source's full size: a Llama-2-7B-shaped decoder, DINOv2-L/14 and SigLIP-so400m/14 at
        224 px. The real encoders have one block more (24 and 27): the source reads the
        second-to-last block, so the last one never runs and is left out here."""
        full = dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                    d_ff=11008, attn_impl="sdpa", image_size=224, patch_size=14,
                    dino_width=1024, dino_depth=23, dino_heads=16,
                    siglip_width=1152, siglip_depth=26, siglip_heads=16)
        return cls(**{**full, **overrides})

    def __post_init__(self):
        for name, allowed in (("attn_impl", ("math", "sdpa", "sdpa_causal")),
                              ("mask_kind", ("causal", "catten")),
                              ("position_mode", ("reindex", "original"))):
            need(getattr(self, name) in allowed,
                 f"CogVLAConfig: expected {name} one of {allowed}", repr(getattr(self, name)))
        need(self.d_model % self.n_heads == 0, f"CogVLAConfig: expected d_model divisible by "
             f"n_heads={self.n_heads}", self.d_model)
        need(self.head_dim % 2 == 0, "CogVLAConfig: expected an even head dim for RoPE",
             self.head_dim)
        need(self.n_heads % self.n_kv_heads == 0, f"CogVLAConfig: expected n_kv_heads dividing "
             f"n_heads={self.n_heads}", self.n_kv_heads)
        need(self.image_size % self.patch_size == 0, f"CogVLAConfig: expected image_size "
             f"divisible by patch_size={self.patch_size}", self.image_size)
        need(0 <= self.bos_id < self.vocab_size,
             f"CogVLAConfig: expected bos_id in [0, {self.vocab_size})", self.bos_id)
        lfp_schedule(self)  # raises on a bad schedule

    # Derived from the fields above on every read, so an edited config is never stale (a model
    # already built keeps the layers it was built with; the decoder refuses a changed schedule).
    @property
    def lfp_ratios(self) -> dict[int, float]:    # {layer: share of vision tokens kept}
        return lfp_schedule(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_vision(self) -> int:           # aggregation tokens per image, or else its patches
        return self.n_images * (self.n_agg_tokens or self.n_patches)

    @property
    def n_queries(self) -> int:
        return self.chunk_len * self.action_dim

    @property
    def vision_start(self) -> int:       # right after BOS
        return 1

    @property
    def text_start(self) -> int:
        return self.vision_start + self.n_vision

    @property
    def action_start(self) -> int:       # the action segment: state tokens, then action queries
        return self.text_start + self.n_text

    @property
    def seq_len(self) -> int:
        return self.action_start + self.n_state + self.n_queries


# %% Llama pieces: RMSNorm, RoPE, attention, MLP, block ========================================
# (conventions of transformers' LlamaModel, so its state dict loads and matches)

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in float32 (in bf16 the mean of squares loses precision), cast back, then
        # scale: the order transformers' LlamaRMSNorm uses, so bf16 outputs match it bit for bit.
        # --- exercise rmsnorm ---
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Real-valued RoPE from explicit position ids, so pruned tokens can carry their positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, position_ids, dtype):
        # Frequencies and angles in float32 whatever the model's dtype, as transformers does (in
        # bf16 an angle of 255 rad is off by up to 1 rad); no buffer that .to(bf16) could round.
        # --- exercise rope ---
        exponents = torch.arange(0, self.head_dim, 2, device=position_ids.device,
                                 dtype=torch.float32)
        inv_freq = 1.0 / self.theta ** (exponents / self.head_dim)           # [Dh/2]
        freqs = position_ids.float()[..., None] * inv_freq                    # [B, N, Dh/2]
        angles = torch.cat([freqs, freqs], dim=-1)                            # [B, N, Dh]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    """Llama's rotate-half layout: dimension i is paired with i + Dh/2, and each pair rotates
    by the angle of frequency i."""
    # --- exercise rope ---
    x1, x2 = x.chunk(2, dim=-1)          # [..., Dh/2] each
    return torch.cat([-x2, x1], dim=-1)  # [..., Dh]


def apply_rope(x, cos, sin):
    """x [B, H, N, Dh]; cos, sin [B or 1, N, Dh], the same for every head."""
    # --- exercise rope ---
    return x * cos[:, None] + rotate_half(x) * sin[:, None]              # [B, H, N, Dh]


class Attention(nn.Module):
    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.cfg = cfg
        d, dh = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * dh, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * dh, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * dh, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * dh, d, bias=False)

    def forward(self, x, cos, sin, mask):
        """mask: [B or 1, 1, N, N], bool ("may attend") or additive float; None for "sdpa_causal".
        GQA: each key/value head serves n_heads / n_kv_heads consecutive query heads, so the
        K/V projections (and a KV cache) are that many times smaller."""
        # --- exercise attention ---
        cfg = self.cfg
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=cfg.n_heads)     # [B, H, N, Dh]
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=cfg.n_kv_heads)  # [B, Hkv, N, Dh]
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=cfg.n_kv_heads)  # [B, Hkv, N, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = cfg.n_heads // cfg.n_kv_heads
        k = repeat(k, "b h n d -> b (h g) n d", g=group)                          # [B, H, N, Dh]
        v = repeat(v, "b h n d -> b (h g) n d", g=group)                          # [B, H, N, Dh]

        if cfg.attn_impl == "math":
            scores = q @ k.transpose(-2, -1) / math.sqrt(cfg.head_dim)           # [B, H, N, N]
            bool_mask = mask.dtype == torch.bool                                 # else additive
            scores = scores.masked_fill(~mask, float("-inf")) if bool_mask else scores + mask
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)      # [B, H, N, N]
            out = probs @ v                                                      # [B, H, N, Dh]
        elif cfg.attn_impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)        # [B, H, N, Dh]
        else:  # "sdpa_causal": the kernel builds the causal pattern itself and takes no mask
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # [B, H, N, Dh]
        return self.o_proj(rearrange(out, "b h n d -> b n (h d)"))               # [B, N, D]


class MLP(nn.Module):
    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        # --- exercise swiglu ---
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU, [B, N, D]


class DecoderLayer(nn.Module):
    """A pre-norm Llama block: x + attention(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)     # [B, N, D]
        return x + self.mlp(self.post_attention_layernorm(x))               # [B, N, D]


def attention_mask(cfg: CogVLAConfig, token_idx):
    """The "may attend" mask [B or 1, 1, K, K] among the tokens at sequence positions
    token_idx [B or 1, K]: row i (query) may see column j (key). For the whole sequence pass
    arange(N). For an LFP layer pass its kept indices: the result is the kept rows and columns
    of the N x N mask (the source's Phase 3), built from the positions without that mask."""
    # --- exercise causal_mask ---
    q, k = token_idx[:, :, None], token_idx[:, None, :]                   # [B, K, 1], [B, 1, K]
    allowed = k <= q                                                      # [B, K, K] causal
    if cfg.mask_kind == "catten":
        # V-L-A coupled attention: the action segment sees itself both ways; earlier tokens
        # still never see it (their rows keep the causal zeros).
        allowed = allowed | ((q >= cfg.action_start) & (k >= cfg.action_start))  # [B, K, K]
    return allowed[:, None]                                               # [B, 1, K, K]


# %% LFP: router, select, gather, scatter, the layer; then the schedule ========================

class Router(nn.Module):
    """Phase 1: score every token's wish to be kept, the vision tokens FiLMed by the text."""

    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.router_film:
            self.film_scale = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, d))
            self.film_shift = nn.Sequential(nn.Linear(d, d // 2), nn.GELU(), nn.Linear(d // 2, d))
        self.score = nn.Linear(d, 2)  # [drop, keep] logits

    def forward(self, h):
        """h: the layer's normalised input [B, N, D] -> keep probability [B, N].
        Why FiLM: with a causal mask the vision tokens come before the text and cannot see it,
        so without FiLM the router could not know what the task is. Only the vision tokens are
        modulated; BOS, text and action are scored as they are."""
        # --- exercise router ---
        cfg = self.cfg
        if cfg.router_film:
            text = h[:, cfg.text_start:cfg.action_start].mean(dim=1)          # [B, D]
            gamma, beta = self.film_scale(text), self.film_shift(text)        # [B, D] each
            vision = h[:, cfg.vision_start:cfg.text_start]                    # [B, V, D]
            vision = vision * (1 + gamma[:, None]) + beta[:, None]            # [B, V, D]
            h = torch.cat([h[:, :cfg.vision_start], vision, h[:, cfg.text_start:]], dim=1)
        logits = self.score(h)                                                # [B, N, 2]
        return logits.softmax(dim=-1)[..., 1]                                 # [B, N] keep


def n_kept_tokens(cfg: CogVLAConfig, ratio: float) -> int:
    """K = all tokens minus the vision tokens this ratio drops (Phase 2)."""
    return cfg.seq_len - cfg.n_vision + int(cfg.n_vision * ratio)


def select(keep_prob, k: int, cfg: CogVLAConfig):
    """Phase 2: the k best tokens, BOS, text and action forced in, in sequence order -> [B, K]
    (re-indexed positions are places in idx: sorted, the kept tokens keep their order)."""
    # --- exercise select ---
    force = torch.zeros_like(keep_prob[0])                                # [N]
    force[:cfg.vision_start] = float("inf")                               # BOS
    force[cfg.text_start:] = float("inf")                                 # text and action segment
    idx = (keep_prob + force).topk(k, dim=-1).indices                     # [B, K] by score
    return idx.sort(dim=-1).values                                        # [B, K] by position


def gather_tokens(x, idx):
    """Phase 3: rows idx of x [B, N, D] -> [B, K, D], out[b, k] = x[b, idx[b, k]]."""
    # --- exercise gather_scatter ---
    batch = torch.arange(x.shape[0], device=x.device)[:, None]            # [B, 1], pairs with idx
    return x[batch, idx]                                                  # [B, K, D]


def scatter_tokens(x, idx, y):
    """Phase 5: a copy of x [B, N, D] with rows idx replaced by the kept tokens' new values
    y [B, K, D]. Replaced, not added (not `scatter_add`, not `+=`): y already holds the
    residual, adding would count x twice."""
    # --- exercise gather_scatter ---
    batch = torch.arange(x.shape[0], device=x.device)[:, None]            # [B, 1], pairs with idx
    out = x.clone()                                                       # [B, N, D]; x unchanged
    out[batch, idx] = y.to(x.dtype)                                       # [B, K, D] rows replaced
    return out


@dataclass
class LFPRecord:
    layer: int                  # the decoder layer's index
    kept_indices: torch.Tensor  # [B, K] sorted positions of the kept tokens
    keep_probs: torch.Tensor    # [B, N] the router's keep probability for every token


class LFPDecoderLayer(DecoderLayer):
    """A Llama block plus a router. Dense (`forward`) it is a plain block; `forward_lfp` prunes."""

    def __init__(self, cfg: CogVLAConfig, layer: int):
        super().__init__(cfg)
        self.cfg, self.layer = cfg, layer
        self.ratio = cfg.lfp_ratios[layer]
        self.n_keep = n_kept_tokens(cfg, self.ratio)
        self.router = Router(cfg)

    # The router weight of every kept token, force-kept ones included, is its softmax
    # probability (the source's code; its narrative says 1.0 for the forced ones). It scales
    # the MLP's output: the only path by which the loss's gradient reaches the router.
    def forward_lfp(self, x, position_ids, rope, records=None):
        # --- exercise lfp_layer ---
        B, N, D = x.shape
        # Phase 1: score, from the layer's own input norm.
        h = self.input_layernorm(x)                                       # [B, N, D]
        keep_prob = self.router(h)                                        # [B, N]
        # Phase 2: select.
        idx = select(keep_prob, self.n_keep, self.cfg)                    # [B, K]
        # Phase 3: gather hidden states, router weights, mask and positions.
        x_kept = gather_tokens(x, idx)                                    # [B, K, D]
        w_kept = keep_prob.gather(1, idx)                                 # [B, K]
        mask_kept = attention_mask(self.cfg, idx)                         # [B, 1, K, K]
        if self.cfg.position_mode == "reindex":
            pos_kept = torch.arange(idx.shape[1], device=x.device)[None]  # [1, K]
        else:                                                             # as p-MoD and FastV do
            pos_kept = position_ids.expand(B, -1).gather(1, idx)          # [B, K]
        cos, sin = rope(pos_kept, x.dtype)                                # [B or 1, K, Dh]
        # Phase 4: a normal block on the kept tokens, its MLP output scaled by the router weight.
        y = x_kept + self.self_attn(self.input_layernorm(x_kept), cos, sin, mask_kept)
        y = y + w_kept[..., None] * self.mlp(self.post_attention_layernorm(y))  # [B, K, D]
        # Phase 5: scatter back; dropped tokens pass unchanged, only new values can be inf/NaN.
        out = scatter_tokens(x, idx, y)                                   # [B, N, D]
        if self.cfg.check_values and not torch.isfinite(y).all():
            raise FloatingPointError(f"LFP layer {self.layer}: inf or NaN in its hidden states")
        if records is not None:
            records.append(LFPRecord(self.layer, idx.detach(), keep_prob.detach()))
        return out  # Phase 6: the next layer sees all N tokens again


# --- the schedule: which layers prune, and how much ------------------------------------

def shifted_cos_with_ratio(average: float, layer: int, n_layers: int) -> float:
    """The reference's keep ratio: high in shallow layers, low in deep ones, mean `average`."""
    # --- exercise schedule ---
    return math.cos(layer * math.pi / (n_layers - 1)) / 2 + average


def shifted_linear_with_ratio(average: float, layer: int, n_layers: int) -> float:
    return (-layer / (n_layers - 1) + 0.5) + average


def shifted_schedule(curve, average: float, top: float, floor: float, n_layers: int):
    """The reference's rule: a layer prunes where the curve is at or below `top` (max), and its
    ratio is floored at `floor` (min) -> {layer: ratio}."""
    # --- exercise schedule ---
    ratios = {l: curve(average, l, n_layers) for l in range(n_layers)}
    return {l: max(r, floor) for l, r in ratios.items() if r <= top}


# The source names layers 5, 10, ..., 30 and prints token counts 227/207/179/140/115/102. Its
# printed ratios (0.85, 0.75, 0.60, 0.40, 0.30, 0.20) do not give those counts (0.75 x 192 = 144
# -> 208 tokens), nor does its formula shifted_cos_with_ratio(0.5, l, 32) (0.937, 0.764, 0.525,
# 0.280, 0.090, 0.003). These do: int(192 x ratio) = 163, 143, 115, 76, 51, 38 vision tokens,
# plus BOS, 20 text and 43 action tokens.
SOURCE_SCHEDULE = {5: 0.85, 10: 0.745, 15: 0.60, 20: 0.40, 25: 0.266, 30: 0.20}
REFERENCE_SCHEDULE = "shiftedcos_decay_0.85_0.15"   # the public code's default
SHIFTED = {"shiftedcos": shifted_cos_with_ratio, "shiftedlinear": shifted_linear_with_ratio}


def lfp_schedule(cfg: CogVLAConfig) -> dict[int, float]:
    """{layer: ratio of vision tokens kept} for the config's schedule; raises on a bad one."""
    s, L = cfg.schedule, cfg.n_layers
    shifted = re.fullmatch(r"(shiftedcos|shiftedlinear)_decay_([\d.]+)_([\d.]+)", str(s))
    if isinstance(s, dict):
        table = dict(s)
    elif s == "source":
        need(L == 32, f'schedule "source": expected 32 layers (else use "{REFERENCE_SCHEDULE}", '
             f'a shiftedlinear one or a {{layer: ratio}} dict)', f"n_layers={L}")
        table = dict(SOURCE_SCHEDULE)
    elif shifted:
        top, floor = float(shifted[2]), float(shifted[3])
        need(0 < floor <= top <= 1, f"schedule {s!r}: expected 0 < min <= max <= 1",
             f"max={top}, min={floor}")
        table = shifted_schedule(SHIFTED[shifted[1]], cfg.lfp_average, top, floor, L)
    else:
        raise ValueError(f'unknown schedule {s!r}: expected "source", "shiftedcos_decay_<max>_'
                         f'<min>", "shiftedlinear_decay_<max>_<min>" or a {{layer: ratio}} dict')
    for layer, ratio in table.items():
        need(isinstance(layer, int) and 0 <= layer < L,
             f"LFP layer index: expected an int in [0, {L})", repr(layer))
        need(0 < ratio <= 1, f"LFP ratio for layer {layer}: expected one in (0, 1]", repr(ratio))
    return dict(sorted(table.items()))


# %% The decoder ===============================================================================

class LlamaDecoder(nn.Module):
    """transformers' LlamaModel, with LFP layers where the schedule says. Without the
    `.router.` parameters its state dict has exactly LlamaModel's keys."""

    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.ratios = cfg.lfp_ratios                                      # read once, as built
        self.built_from = repr((cfg.schedule, cfg.lfp_average, cfg.n_layers))  # to see a change
        self.layers = nn.ModuleList(LFPDecoderLayer(cfg, i) if i in self.ratios
                                    else DecoderLayer(cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, embeds, prune: bool = True, position_ids=None, records: list | None = None):
        """embeds [B, N, D] -> final-norm hidden states [B, N, D]. Pass a list as `records`
        to receive one LFPRecord per LFP layer that ran."""
        cfg, N = self.cfg, embeds.shape[1]
        prune = prune and bool(self.ratios)
        self.check_can_run(prune, N)
        all_tokens = torch.arange(N, device=embeds.device)[None]          # [1, N]
        mask = None if cfg.attn_impl == "sdpa_causal" else attention_mask(cfg, all_tokens)
        position_ids = all_tokens if position_ids is None else position_ids  # [1 or B, N]
        cos, sin = self.rotary_emb(position_ids, embeds.dtype)            # [1 or B, N, Dh]
        x = embeds
        for layer in self.layers:
            if prune and isinstance(layer, LFPDecoderLayer):
                x = layer.forward_lfp(x, position_ids, self.rotary_emb, records)
            else:
                x = layer(x, cos, sin, mask)                              # [B, N, D]
        return self.norm(x)

    def check_can_run(self, prune: bool, n_tokens: int):
        cfg, causal_kernel = self.cfg, self.cfg.attn_impl == "sdpa_causal"   # as flash-attn does
        if prune and causal_kernel:
            raise ValueError('attn_impl="sdpa_causal" takes no mask, but an LFP layer needs its '
                             'gathered mask (the source\'s FAQ: gather/scatter conflicts with '
                             'flash-attn): expected "sdpa" or "math", or prune=False')
        if causal_kernel and cfg.mask_kind != "causal":
            raise ValueError(f'attn_impl="sdpa_causal": expected mask_kind "causal", got '
                             f'{cfg.mask_kind!r}')
        if prune and self.built_from != repr((cfg.schedule, cfg.lfp_average, cfg.n_layers)):
            raise ValueError(f"cfg.schedule was changed after this model was built: expected its "
                             f"LFP layers' ratios {self.ratios} (build a new model for a new "
                             f"schedule), got {cfg.lfp_ratios}")
        if (prune or cfg.mask_kind == "catten") and n_tokens != cfg.seq_len:
            raise ValueError(f"LFP and catten need the config's layout: expected {cfg.seq_len} "
                             f"tokens, got {n_tokens}")


# %% The vision tower: two ViTs with FiLM and aggregation tokens, projectors, MoE fusion =======

class ViTBlock(nn.Module):
    """A pre-norm ViT block with FiLM between attention and MLP, conditioned on the instruction.
    FiLM is `x * (1 + gamma) + beta`, so zero-initialised gamma and beta start as the identity."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, d_cond: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.film_scale = nn.Linear(d_cond, width)  # gamma
        self.film_shift = nn.Linear(d_cond, width)  # beta
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, cond):
        # --- exercise vit_film ---
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d",
                            three=3, h=self.heads)                          # [B', h, n, d] each
        attn = F.scaled_dot_product_attention(q, k, v)                      # bidirectional
        x = x + self.proj(rearrange(attn, "b h n d -> b n (h d)"))          # [B', n, Dv]
        gamma, beta = self.film_scale(cond), self.film_shift(cond)          # [B', Dv] each
        x = x * (1 + gamma[:, None]) + beta[:, None]                        # [B', n, Dv]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patchify, embed, append aggregation tokens, run the FiLMed blocks, keep the agg tokens."""

    def __init__(self, cfg: CogVLAConfig, width: int, depth: int, heads: int):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.n_patches, width))
        G = cfg.n_agg_tokens
        self.agg_tokens = nn.Parameter(torch.zeros(G, width)) if G else None
        # The source reads the second-to-last block of each pretrained encoder; the last one
        # would never run, so `depth` counts only the blocks that do.
        self.blocks = nn.ModuleList(ViTBlock(width, heads, cfg.vit_mlp_ratio, cfg.d_model)
                                    for _ in range(depth))

    def forward(self, images, cond):
        p = self.cfg.patch_size
        patches = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        x = self.patch_embed(patches) + self.pos_embed                    # [B', P, Dv]
        if self.agg_tokens is not None:
            agg = self.agg_tokens.expand(x.shape[0], -1, -1)               # [B', G, Dv]
            x = torch.cat([x, agg], dim=1)                                 # [B', P + G, Dv]
        for block in self.blocks:
            x = block(x, cond)
        if self.agg_tokens is not None:
            return x[:, self.cfg.n_patches:]   # [B', G, Dv] the aggregation tokens sum up the image
        return x                               # [B', P, Dv] patch mode: every patch is a token


def sincos_2d(side: int, width: int):
    """[side * side, width]: sines and cosines of row and column at geometric frequencies."""
    n_freq = width // 4
    freqs = 1.0 / 100 ** (torch.arange(n_freq) / max(1, n_freq - 1))         # [width/4]
    row, col = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    angles = [rearrange(c, "h w -> (h w) 1").float() * freqs for c in (row, col)]  # 2 x [P, w/4]
    code = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # [P, w]
    return F.pad(code, (0, width - code.shape[1]))                            # [P, width]


def projector(width: int, d_model: int):
    return nn.Sequential(nn.Linear(width, d_model), nn.GELU(), nn.Linear(d_model, d_model))


class VisionTower(nn.Module):
    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.cfg = cfg
        self.dino = ViT(cfg, cfg.dino_width, cfg.dino_depth, cfg.dino_heads)
        self.siglip = ViT(cfg, cfg.siglip_width, cfg.siglip_depth, cfg.siglip_heads)
        self.dino_proj = projector(cfg.dino_width, cfg.d_model)
        self.siglip_proj = projector(cfg.siglip_width, cfg.d_model)
        # MoE fusion: the instruction decides how much of each encoder to use.
        self.fusion = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model // 2), nn.GELU(),
                                    nn.Linear(cfg.d_model // 2, 2))

    def forward(self, images, instruction):
        """images [B, I, 3, H, W], instruction (mean text embedding) [B, D] -> [B, V, D]."""
        n_img = images.shape[1]
        flat = rearrange(images, "b i c h w -> (b i) c h w")                      # [B I, 3, H, W]
        cond = repeat(instruction, "b d -> (b i) d", i=n_img)                     # [B I, D]
        dino = self.dino_proj(self.dino(flat, cond))                              # [B I, G, D]
        siglip = self.siglip_proj(self.siglip(flat, cond))                        # [B I, G, D]
        # --- exercise fusion ---
        weights = self.fusion(instruction).softmax(-1)                            # [B, 2]
        weights = repeat(weights, "b e -> (b i) e", i=n_img)                      # [B I, 2]
        fused = weights[:, 0, None, None] * dino + weights[:, 1, None, None] * siglip
        return rearrange(fused, "(b i) g d -> b (i g) d", i=n_img)                # [B, V, D]


# %% CogVLA: vision tower + LLM with LFP + action head, one forward pass for the whole chunk ===

@dataclass
class CogVLAOutput:
    actions: torch.Tensor                 # [B, chunk_len, action_dim]
    loss: torch.Tensor | None             # L1 against the given actions, else None
    lfp: list[LFPRecord] = field(default_factory=list)  # one per LFP layer that ran
    vision_tokens: torch.Tensor | None = None  # [B, V, D] what the LLM received (for probes)


class CogVLA(nn.Module):
    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.vision = VisionTower(cfg)
        self.llm = LlamaDecoder(cfg)
        # The action segment (OFT-style): one token per state value, one query per action value.
        self.state_proj = nn.Linear(1, d)
        self.state_embed = nn.Parameter(torch.zeros(cfg.n_state, d))     # which state value
        self.action_queries = nn.Parameter(torch.zeros(cfg.n_queries, d))
        self.action_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.reset_parameters()

    def reset_parameters(self):
        """All initialisation in one place."""
        cfg = self.cfg
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # std 1/sqrt(fan_in) keeps activations at unit scale in every layer: 0.016 at
                # d_model 4096, near Llama's 0.02, which at width 64 would shrink them 6-fold.
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                # The same rule with fan-in 1 (a one-hot input). The vision FiLM reads the mean
                # of these: at 0.02 it would be far weaker than the image features it modulates.
                nn.init.normal_(module.weight, std=1.0)
        # Which state value a token carries: not small. The first layer reads each token through
        # RMSNorm, which maps state_proj(s) = s * w (its bias starts at 0) to +-w / rms(w) and so
        # erases the value's size; only an embedding of comparable size beside it lets
        # norm(s * w + e) turn with s. Much larger, and it drowns the value.
        nn.init.normal_(self.state_embed, std=0.3)
        # Queries that predict the same action value (dx at every chunk step, say) start alike:
        # where to look, once one learns it, is learned for all; 2% apart, they can part later.
        per_value = 0.02 * torch.randn(cfg.action_dim, cfg.d_model)      # [action dim, D]
        per_query = repeat(per_value, "a d -> (c a) d", c=cfg.chunk_len)  # [Q, D]
        self.action_queries.data.copy_(per_query + 0.02 * 0.02 * torch.randn_like(per_query))
        for vit in (self.vision.dino, self.vision.siglip):
            # Pretrained encoders know where each patch is; ours start from a 2-D sin-cos code of
            # (row, column) so that position is readable from step 0 (it still trains).
            side = cfg.image_size // cfg.patch_size
            vit.pos_embed.data.copy_(sincos_2d(side, vit.pos_embed.shape[1]))
            if vit.agg_tokens is not None:
                nn.init.normal_(vit.agg_tokens, std=0.02)
            for block in vit.blocks:                      # FiLM starts as identity: gamma, beta 0
                for film in (block.film_scale, block.film_shift):
                    nn.init.zeros_(film.weight)
                    nn.init.zeros_(film.bias)
        nn.init.zeros_(self.vision.fusion[-1].weight)     # an equal mix of the encoders at first
        for layer in self.llm.layers:
            if not isinstance(layer, LFPDecoderLayer):
                continue
            # The router starts generous and nearly indifferent: keep probability near 0.88 (+2
            # on the "keep" logit), small weights only to break ties. It scales each kept
            # token's MLP output (Phase 4): a wide spread would silence MLPs before any learning.
            nn.init.normal_(layer.router.score.weight, std=0.1 * cfg.d_model ** -0.5)
            layer.router.score.bias.data.copy_(torch.tensor([0.0, 2.0]))    # [drop, keep]
            if cfg.router_film:
                for mlp in (layer.router.film_scale, layer.router.film_shift):
                    nn.init.zeros_(mlp[-1].weight)        # the router's FiLM starts as identity too
                    nn.init.zeros_(mlp[-1].bias)

    def check_inputs(self, images, text_ids, state, actions):
        cfg = self.cfg
        shapes = {"images": (cfg.n_images, 3, cfg.image_size, cfg.image_size),
                  "text_ids": (cfg.n_text,), "state": (cfg.n_state,),
                  "actions": (cfg.chunk_len, cfg.action_dim)}
        given = {n: t for n, t in zip(shapes, (images, text_ids, state, actions)) if t is not None}
        for name, t in given.items():
            want = ", ".join(map(str, ("B",) + shapes[name]))
            hint = " (pad or truncate)" if name == "text_ids" else ""
            need(list(t.shape[1:]) == list(shapes[name]) and t.dim() == len(shapes[name]) + 1,
                 f"{name}: expected [{want}]{hint}", list(t.shape))
        need(text_ids.dtype in (torch.int32, torch.int64), "text_ids: expected integer token ids",
             f"dtype {text_ids.dtype}")
        batch = {name: t.shape[0] for name, t in given.items()}
        need(len(set(batch.values())) == 1, "batch sizes disagree: expected one batch size", batch)
        if cfg.check_values:
            lo, hi = int(text_ids.min()), int(text_ids.max())
            need(0 <= lo and hi < cfg.vocab_size,
                 f"text_ids: expected ids in [0, {cfg.vocab_size})", f"values in [{lo}, {hi}]")
            for name in ("images", "state"):
                bad = int((~torch.isfinite(given[name])).sum())
                need(bad == 0, f"{name}: expected finite values", f"{bad} inf or NaN")

    def embed(self, images, text_ids, state):
        """Build the LLM's input sequence [B, N, D]: [BOS] [vision] [text] [state] [queries]."""
        B = text_ids.shape[0]
        text = self.llm.embed_tokens(text_ids)                              # [B, T, D]
        vision = self.vision(images, text.mean(dim=1))                      # [B, V, D]
        bos = self.llm.embed_tokens.weight[self.cfg.bos_id].expand(B, 1, -1)  # [B, 1, D]
        state_tokens = self.state_proj(state[..., None]) + self.state_embed  # [B, S, D]
        queries = self.action_queries.expand(B, -1, -1)                     # [B, Q, D]
        return torch.cat([bos, vision.to(text.dtype), text, state_tokens, queries], dim=1)

    def forward(self, images, text_ids, state, actions=None, prune: bool = True) -> CogVLAOutput:
        self.check_inputs(images, text_ids, state, actions)
        cfg, records = self.cfg, []
        embeds = self.embed(images, text_ids, state)                        # [B, N, D]
        hidden = self.llm(embeds, prune=prune, records=records)             # [B, N, D]
        queries = hidden[:, -cfg.n_queries:]                                # [B, Q, D]
        pred = rearrange(self.action_head(queries), "b (c a) 1 -> b c a", c=cfg.chunk_len)
        loss = F.l1_loss(pred.float(), actions.float()) if actions is not None else None
        return CogVLAOutput(pred, loss, records, embeds[:, cfg.vision_start:cfg.text_start])

    def example_inputs(self, batch_size: int = 2, seed: int = 0):
        """Valid random (images, text_ids, state, actions) on the model's device."""
        cfg, g, B = self.cfg, torch.Generator().manual_seed(seed), batch_size
        images = torch.rand(B, cfg.n_images, 3, cfg.image_size, cfg.image_size, generator=g)
        text_ids = torch.randint(0, cfg.vocab_size, (B, cfg.n_text), generator=g)
        state = torch.rand(B, cfg.n_state, generator=g) * 2 - 1
        actions = torch.rand(B, cfg.chunk_len, cfg.action_dim, generator=g) * 2 - 1
        device = self.llm.embed_tokens.weight.device
        return tuple(t.to(device) for t in (images, text_ids, state, actions))


# %% Accounting: what a schedule costs, per layer, at any size =================================

@dataclass
class LayerCost:
    layer: int
    tokens: int           # tokens this layer's block processes (per sample)
    attn_n2d: float       # N^2 x D per sample, the source's per-layer attention figure
    # The rest for the whole batch:
    attn_flops: float     # 4 N^2 D: QK^T and AV, 2 FLOPs per multiply-add
    linear_flops: float   # 2 x tokens x (q, k, v, o, gate, up, down weights)
    router_flops: float   # the router's matmuls: its score on all N tokens, the FiLM MLPs
    kv_bytes: float       # K and V of this layer's tokens

    @property
    def flops(self) -> float:
        return self.attn_flops + self.linear_flops + self.router_flops


@dataclass
class Accounting:
    layers: list[LayerCost]   # with the schedule
    dense: list[LayerCost]    # every layer on all N tokens

    def total(self, attr: str, dense: bool = False) -> float:
        return sum(getattr(c, attr) for c in (self.dense if dense else self.layers))

    @property
    def token_share(self) -> float:
        return self.total("tokens") / self.total("tokens", dense=True)

    @property
    def speedup_bound(self) -> float:
        """Dense FLOPs / LFP FLOPs: no implementation of this schedule can do better."""
        return self.total("flops", dense=True) / self.total("flops")


def account(cfg: CogVLAConfig, batch_size: int = 1, bytes_per_value: int = 2,
            pruning_persists: bool = False) -> Accounting:
    """Per-layer cost of cfg's schedule vs dense. Elementwise work (norms, softmax, RoPE) is
    left out; the router is counted. `pruning_persists=True` is the source's figure's
    assumption (standard layers run on the last LFP layer's K), which its own scatter design
    contradicts."""
    N, D, F_, L = cfg.seq_len, cfg.d_model, cfg.d_ff, cfg.n_layers
    d_kv = cfg.n_kv_heads * cfg.head_dim
    weights = D * D + 2 * D * d_kv + D * D + 3 * D * F_               # q, k, v, o, gate, up, down

    def cost(layer, tokens, lfp):
        router = 0.0
        if lfp:
            router = 2 * N * D * 2                                     # score Linear(D, 2) on all N
            if cfg.router_film:                       # 2 MLPs D -> D/2 -> D on the text's mean
                router += 2 * 2 * (D * (D // 2) + (D // 2) * D)
        per_sample = dict(attn_flops=4.0 * tokens ** 2 * D, linear_flops=2.0 * tokens * weights,
                          router_flops=router, kv_bytes=2.0 * tokens * d_kv * bytes_per_value)
        return LayerCost(layer=layer, tokens=tokens, attn_n2d=float(tokens ** 2 * D),
                         **{name: value * batch_size for name, value in per_sample.items()})

    layers, tokens, ratios = [], N, cfg.lfp_ratios
    for l in range(L):
        if l in ratios:
            tokens = n_kept_tokens(cfg, ratios[l])
        elif not pruning_persists:                       # else the last LFP layer's K carries on
            tokens = N
        layers.append(cost(l, tokens, l in ratios))
    return Accounting(layers, [cost(l, N, False) for l in range(L)])


# %% Walkthrough: `python cogvla_mini.py` ======================================================

def parameter_report(model: CogVLA) -> dict[str, int]:
    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())
    v, llm = model.vision, model.llm
    routers = count(*(l.router for l in llm.layers if isinstance(l, LFPDecoderLayer)))
    head = sum(p.numel() for n, p in model.named_parameters()
               if n.startswith(("state_", "action_")))
    return {"vision: DINOv2-like ViT": count(v.dino), "vision: SigLIP-like ViT": count(v.siglip),
            "vision: projectors + fusion": count(v.dino_proj, v.siglip_proj, v.fusion),
            "llm: Llama decoder (no routers)": count(llm) - routers,
            "llm: LFP routers (with FiLM)": routers, "action segment + head": head}


def walkthrough():
    torch.manual_seed(0)
    for schedule in ("source", REFERENCE_SCHEDULE):
        cfg = CogVLAConfig.tiny(schedule=schedule)
        model = CogVLA(cfg).eval()
        with torch.no_grad():
            out = model(*model.example_inputs(batch_size=2)[:3])            # images, text, state
        processed = {r.layer: r.kept_indices.shape[1] for r in out.lfp}   # read from the pass
        acc = account(CogVLAConfig.full(schedule=schedule))
        print(f"\n=== schedule {schedule!r}: tiny model forward (D={cfg.d_model}), costs at the "
              f"source's size (D={CogVLAConfig.full().d_model}) ===")
        print(f"{'layer':>5} {'tokens (pass)':>13} {'vision kept':>11} {'N^2*D (M)':>10} "
              f"{'linear GFLOP':>12} {'KV MiB':>7}")
        for c in acc.layers:
            n = processed.get(c.layer, cfg.seq_len)
            vis = n - (cfg.seq_len - cfg.n_vision)
            tag = " LFP" if c.layer in processed else ""
            print(f"{c.layer:>5} {n:>13} {vis:>11} {c.attn_n2d / 1e6:>10.0f} "
                  f"{c.linear_flops / 1e9:>12.2f} {c.kv_bytes / 2**20:>7.2f}{tag}")
        attn, attn_dense = acc.total("attn_n2d") / 1e9, acc.total("attn_n2d", True) / 1e9
        kv, kv_dense = acc.total("kv_bytes") / 2**20, acc.total("kv_bytes", True) / 2**20
        print(f"tokens processed: {acc.token_share:.1%} of dense | attention N^2*D: {attn:.2f} G "
              f"vs dense {attn_dense:.2f} G | KV: {kv:.0f} MiB vs {kv_dense:.0f} MiB (fp16, per "
              f"sample) | FLOP-bound speedup {acc.speedup_bound:.3f}x")
        if schedule == "source":   # the source's "1.68x" is attention's N^2*D alone: 8.59 / 5.12
            fig_attn = account(CogVLAConfig.full(), pruning_persists=True).total("attn_n2d") / 1e9
            print(f"attention N^2*D alone: the source's figure assumes pruning persists between "
                  f"LFP layers: {fig_attn:.2f} G (it prints 5.12 G), {attn_dense / fig_attn:.2f}x; "
                  f"its own scatter (Phase 6) gives {attn_dense / attn:.2f}x")
    print("\n=== parameters (tiny preset, the source's schedule: 6 routers) ===")
    for name, n in parameter_report(CogVLA(CogVLAConfig.tiny())).items():
        print(f"{name:<34} {n:>10,}")


if __name__ == "__main__":
    walkthrough()
