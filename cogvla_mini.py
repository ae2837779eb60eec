"""CogVLA-mini: CogVLA's vision tower and its Llama decoder with LFP, in one readable file.

LFP (layer-wise feature pruning) lets some decoder layers run on fewer tokens: a router
scores every token, the layer keeps the top-k vision tokens (plus every non-vision token),
runs a normal Llama block on those, and scatters the results back. Dropped tokens skip the
layer unchanged; the next layer sees all N tokens again.

The sequence the LLM sees (the seed's layout, every count a config field):

    [BOS] [192 vision] [20 text] [3 state + 40 action queries]   = 256 tokens
      0      1..192     193..212          213..255

Read it top to bottom: config, Llama pieces, LFP, decoder, vision tower, CogVLA,
accounting, walkthrough. `python cogvla_mini.py` runs the walkthrough; `python bench.py`
times dense vs LFP.

Shape legend (used in the comments at the end of lines):
    B batch          N tokens in the LLM sequence      K tokens kept by an LFP layer
    D d_model        H attention heads                 Hkv key/value heads (GQA)
    Dh head dim      F MLP hidden size                 V vision tokens (n_images x per image)
    T text tokens    I camera images                   P patches per image
    G aggregation tokens per image                     Dv ViT width
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat


# %% ====================================================================================
# Config
# ======================================================================================

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
    attn_impl: str = "math"         # "math" (softmax you can step into), "sdpa", or "sdpa_causal" (is_causal, no mask)
    mask_kind: str = "causal"       # "causal" (the seed) or "catten" (action segment bidirectional)
    # --- the sequence layout ---
    n_images: int = 3               # I, camera images per sample
    n_agg_tokens: int = 64          # G, aggregation tokens per image; 0 = use the ViT's patch tokens instead
    n_text: int = 20                # T, instruction tokens (padded/truncated to this)
    n_state: int = 3                # proprioceptive state values, one token each
    chunk_len: int = 10             # predicted action steps
    action_dim: int = 4             # values per action step (dx, dy, dz, gripper)
    bos_id: int = 1                 # the BOS token id
    # --- the vision tower ---
    image_size: int = 28            # square images, pixels
    patch_size: int = 7             # ViT patch size, pixels
    dino_width: int = 32            # DINOv2-like encoder width
    dino_depth: int = 2             # its blocks that run (the output is read after the last of them)
    dino_heads: int = 2             # its attention heads
    siglip_width: int = 48          # SigLIP-like encoder width
    siglip_depth: int = 2           # its blocks that run
    siglip_heads: int = 2           # its attention heads
    vit_mlp_ratio: float = 4.0      # ViT MLP hidden = ratio x width
    # --- LFP ---
    schedule: str | dict = "seed"   # "seed", "shiftedcos_decay_<max>_<min>", "shiftedlinear_decay_<max>_<min>", or {layer: ratio}
    lfp_average: float = 0.5        # the average ratio of the shifted schedules (the reference's 0.5)
    router_film: bool = True        # FiLM the vision tokens with the text before the router scores them
    position_mode: str = "reindex"  # kept tokens get positions 0..K-1 ("reindex", the seed) or keep theirs ("original")
    # --- checks (each reads a value back, which waits for a GPU: the benchmark turns them off) ---
    check_values: bool = True       # token ids in range, finite images and state, finite LFP outputs

    @classmethod
    def tiny(cls, **overrides) -> "CogVLAConfig":
        """The seed's layout and schedule (32 layers, LFP at 5..30, 192/20/43 tokens) at tiny widths."""
        return cls(**overrides)

    @classmethod
    def seed(cls, **overrides) -> "CogVLAConfig":
        """The source's full size: Llama-2-7B-shaped decoder, DINOv2-L/14 + SigLIP-so400m/14 at 224 px.
        The real encoders have one block more (24 and 27) than runs here: the output is read
        from the second-to-last block, so the last one never runs."""
        full = dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
                    attn_impl="sdpa", image_size=224, patch_size=14,
                    dino_width=1024, dino_depth=23, dino_heads=16,
                    siglip_width=1152, siglip_depth=26, siglip_heads=16)
        return cls(**{**full, **overrides})

    def __post_init__(self):
        def need(ok, what, got):
            if not ok:
                raise ValueError(f"CogVLAConfig: expected {what}, got {got!r}")
        need(self.attn_impl in ("math", "sdpa", "sdpa_causal"), "attn_impl 'math', 'sdpa' or 'sdpa_causal'",
             self.attn_impl)
        need(self.mask_kind in ("causal", "catten"), "mask_kind 'causal' or 'catten'", self.mask_kind)
        need(self.position_mode in ("reindex", "original"), "position_mode 'reindex' or 'original'", self.position_mode)
        need(self.d_model % self.n_heads == 0, f"d_model divisible by n_heads={self.n_heads}", self.d_model)
        need(self.head_dim % 2 == 0, "an even head dim for RoPE", self.head_dim)
        need(self.n_heads % self.n_kv_heads == 0, f"n_kv_heads dividing n_heads={self.n_heads}", self.n_kv_heads)
        need(self.image_size % self.patch_size == 0, f"image_size divisible by patch_size={self.patch_size}",
             self.image_size)
        need(0 <= self.bos_id < self.vocab_size, f"bos_id in [0, {self.vocab_size})", self.bos_id)
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
    def tokens_per_image(self) -> int:
        return self.n_agg_tokens if self.n_agg_tokens > 0 else self.n_patches

    @property
    def n_vision(self) -> int:
        return self.n_images * self.tokens_per_image

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


# %% ====================================================================================
# Llama pieces: RMSNorm, RoPE, attention, MLP, block
# (conventions of transformers' LlamaModel, so its state dict loads and matches)
# ======================================================================================

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # --- exercise rmsnorm: begin ---
        # Normalise in float32 (bf16 squares overflow precision), cast back, then scale.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
        # --- exercise rmsnorm: end ---


class RotaryEmbedding(nn.Module):
    """Real-valued RoPE from explicit position ids, so pruned tokens can carry their positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, position_ids, dtype):
        # --- exercise rope: begin ---
        # Frequencies and angles in float32 whatever the model's dtype (as transformers does): in
        # bf16 the fast frequencies round by up to ~0.2%, 0.3 rad at position 255. Computing
        # them here, not keeping a buffer, means model.to(torch.bfloat16) cannot round them.
        exponents = torch.arange(0, self.head_dim, 2, device=position_ids.device, dtype=torch.float32)
        inv_freq = 1.0 / self.theta ** (exponents / self.head_dim)           # [Dh/2]
        freqs = position_ids.float()[..., None] * inv_freq                    # [B, N, Dh/2]
        angles = torch.cat([freqs, freqs], dim=-1)                            # [B, N, Dh]  rotate-half layout
        return angles.cos().to(dtype), angles.sin().to(dtype)
        # --- exercise rope: end ---


def rotate_half(x):
    # --- exercise rope: begin ---
    x1, x2 = x.chunk(2, dim=-1)          # [..., Dh/2] each
    return torch.cat([-x2, x1], dim=-1)  # [..., Dh]
    # --- exercise rope: end ---


def apply_rope(x, cos, sin):
    # --- exercise rope: begin ---
    # x [B, H, N, Dh]; cos, sin [B, N, Dh] -> one copy per head
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
    # --- exercise rope: end ---


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
        """mask: [B or 1, 1, N, N], bool ("may attend") or additive float; None for "sdpa_causal"."""
        # --- exercise attention: begin ---
        cfg = self.cfg
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=cfg.n_heads)     # [B, H, N, Dh]
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=cfg.n_kv_heads)  # [B, Hkv, N, Dh]
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=cfg.n_kv_heads)  # [B, Hkv, N, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA: each key/value head serves n_heads / n_kv_heads consecutive query heads.
        group = cfg.n_heads // cfg.n_kv_heads
        k = repeat(k, "b h n d -> b (h g) n d", g=group)                          # [B, H, N, Dh]
        v = repeat(v, "b h n d -> b (h g) n d", g=group)                          # [B, H, N, Dh]

        if cfg.attn_impl == "math":
            scores = q @ k.transpose(-2, -1) / math.sqrt(cfg.head_dim)           # [B, H, N, N]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)      # [B, H, N, N]
            out = probs @ v                                                      # [B, H, N, Dh]
        elif cfg.attn_impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)        # [B, H, N, Dh]
        else:  # "sdpa_causal": the kernel builds the causal pattern itself and takes no mask tensor
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # [B, H, N, Dh]
        return self.o_proj(rearrange(out, "b h n d -> b n (h d)"))               # [B, N, D]
        # --- exercise attention: end ---


class MLP(nn.Module):
    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        # --- exercise swiglu: begin ---
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU, [B, N, D]
        # --- exercise swiglu: end ---


class DecoderLayer(nn.Module):
    """A pre-norm Llama block. `mlp_weight` [B, N] scales the MLP output (LFP's Phase 4);
    `x_normed` is input_layernorm(x) when the caller has computed it already."""

    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, mlp_weight=None, x_normed=None):
        h = self.input_layernorm(x) if x_normed is None else x_normed     # [B, N, D]
        x = x + self.self_attn(h, cos, sin, mask)                         # [B, N, D]
        m = self.mlp(self.post_attention_layernorm(x))                    # [B, N, D]
        if mlp_weight is not None:
            m = m * mlp_weight[..., None]                                 # [B, N, D]
        return x + m


def attention_mask(cfg: CogVLAConfig, token_idx):
    """The "may attend" mask [B or 1, 1, K, K] among the tokens at sequence positions
    token_idx [B or 1, K]: row i (query) may see column j (key). For the whole sequence pass
    arange(N); for an LFP layer pass its kept indices, and the result equals the kept rows and
    columns of the N x N mask (Phase 3) without building or gathering that one (see gather_mask)."""
    # --- exercise causal_mask: begin ---
    q, k = token_idx[:, :, None], token_idx[:, None, :]                   # [B, K, 1], [B, 1, K]
    allowed = k <= q                                                      # [B, K, K] causal
    if cfg.mask_kind == "catten":
        # V-L-A coupled attention: the action segment sees itself both ways; earlier tokens
        # still never see it (their rows keep the causal zeros).
        allowed = allowed | ((q >= cfg.action_start) & (k >= cfg.action_start))  # [B, K, K]
    return allowed[:, None]                                               # [B, 1, K, K]
    # --- exercise causal_mask: end ---


# %% ====================================================================================
# LFP: router, select, gather, scatter, the layer; then the schedule
# ======================================================================================

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
        """h: the layer's normalised input [B, N, D] -> keep probability [B, N]."""
        # --- exercise router: begin ---
        cfg = self.cfg
        logits = self.score(h)                                                # [B, N, 2] [drop, keep]
        if cfg.router_film:
            # Why FiLM matters: with a causal mask the vision tokens come before the text and
            # cannot see it, so without FiLM the router could not know what the task is.
            text = h[:, cfg.text_start:cfg.action_start].mean(dim=1)          # [B, D]
            gamma, beta = self.film_scale(text), self.film_shift(text)        # [B, D] each
            vision = h[:, cfg.vision_start:cfg.text_start]                    # [B, V, D]
            vision = vision * (1 + gamma[:, None]) + beta[:, None]            # [B, V, D]
            # Only the vision tokens are modulated; BOS, text and action keep their own scores.
            # (Splicing the [B, N, 2] logits costs less than concatenating [B, N, D] states.)
            logits = torch.cat([logits[:, :cfg.vision_start], self.score(vision),
                                logits[:, cfg.text_start:]], dim=1)          # [B, N, 2]
        return logits.softmax(dim=-1)[..., 1]                                 # [B, N] keep probability
        # --- exercise router: end ---


def n_kept_tokens(cfg: CogVLAConfig, ratio: float) -> int:
    """K = all tokens minus the vision tokens this ratio drops (Phase 2.1)."""
    visual_kept = int(cfg.n_vision * ratio)
    return cfg.seq_len - (cfg.n_vision - visual_kept)


def select(keep_prob, k: int, cfg: CogVLAConfig):
    """Phase 2: the k best tokens, BOS, text and action forced in, in sequence order -> [B, K]."""
    # --- exercise select: begin ---
    force = torch.zeros_like(keep_prob[0])                                # [N]
    force[:cfg.vision_start] = float("inf")                               # BOS
    force[cfg.text_start:] = float("inf")                                 # text and action segment
    idx = (keep_prob + force).topk(k, dim=-1).indices                     # [B, K] by score
    return idx.sort(dim=-1).values                                        # [B, K] by position
    # --- exercise select: end ---


def gather_tokens(x, idx):
    """Phase 3: rows idx of x [B, N, D] -> [B, K, D], out[b, k] = x[b, idx[b, k]]. (The same as
    x.gather(1, idx[..., None].expand(-1, -1, D)), which on a CPU takes ~3x longer.)"""
    # --- exercise gather_scatter: begin ---
    batch = torch.arange(x.shape[0], device=x.device)[:, None]            # [B, 1], paired with idx [B, K]
    return x[batch, idx]                                                  # [B, K, D]
    # --- exercise gather_scatter: end ---


def gather_mask(mask, idx):
    """Phase 3 as the seed writes it: the kept rows, then the kept columns, of the full mask
    [B or 1, 1, N, N] -> [B, 1, K, K]. The LFP layer builds the same mask straight from the kept
    indices with attention_mask(cfg, idx), which is cheaper; a test proves the two equal."""
    # --- exercise gather_scatter: begin ---
    B, K, N = idx.shape[0], idx.shape[1], mask.shape[-1]
    mask = mask.expand(B, -1, -1, -1)                                     # [B, 1, N, N]
    rows = mask.gather(2, idx[:, None, :, None].expand(-1, 1, -1, N))     # [B, 1, K, N]
    return rows.gather(3, idx[:, None, None, :].expand(-1, 1, K, -1))     # [B, 1, K, K]
    # --- exercise gather_scatter: end ---


def scatter_tokens(x, idx, y):
    """Phase 5: a copy of x [B, N, D] with rows idx replaced by the kept tokens' new values
    y [B, K, D]. Replaced, not added (not `scatter_add`, not `+=`): y already holds the residual,
    adding would count x twice. (x.scatter(1, idx[..., None].expand(-1, -1, D), y) is the same,
    ~3x slower on a CPU.)"""
    # --- exercise gather_scatter: begin ---
    batch = torch.arange(x.shape[0], device=x.device)[:, None]            # [B, 1], paired with idx [B, K]
    out = x.clone()                                                       # [B, N, D]; x stays as it was
    out[batch, idx] = y.to(x.dtype)                                       # [B, K, D] rows replaced
    return out
    # --- exercise gather_scatter: end ---


@dataclass
class LFPRecord:
    layer: int                 # the decoder layer's index
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

    def forward_lfp(self, x, position_ids, rope, records=None):
        # --- exercise lfp_layer: begin ---
        B, N, D = x.shape
        # Phase 1: score. The router reads the block's own input norm, so it is computed once
        # for all N tokens and the block reuses the kept rows (RMSNorm works token by token).
        h = self.input_layernorm(x)                                       # [B, N, D]
        keep_prob = self.router(h)                                        # [B, N]
        # Phase 2: select.
        idx = select(keep_prob, self.n_keep, self.cfg)                    # [B, K]
        # Phase 3: gather hidden states (and their norm), router weights, mask and positions.
        x_kept, h_kept = gather_tokens(x, idx), gather_tokens(h, idx)     # [B, K, D] each
        # The router weight of every kept token, force-kept ones included, is its softmax
        # probability (the seed's code; its narrative says 1.0 for the forced ones).
        w_kept = keep_prob.gather(1, idx)                                 # [B, K]
        mask_kept = attention_mask(self.cfg, idx)                         # [B, 1, K, K] = gather_mask(full, idx)
        if self.cfg.position_mode == "reindex":
            pos_kept = torch.arange(idx.shape[1], device=x.device)[None]  # [1, K]  0..K-1, as the seed
        else:
            pos_kept = position_ids.expand(B, -1).gather(1, idx)          # [B, K]  as p-MoD and FastV
        cos, sin = rope(pos_kept, x.dtype)                                # [B or 1, K, Dh]
        # Phase 4: a normal block on the kept tokens; the router weight scales the MLP
        # output, the only path by which the loss's gradient reaches the router.
        y = super().forward(x_kept, cos, sin, mask_kept, mlp_weight=w_kept, x_normed=h_kept)  # [B, K, D]
        # Phase 5: scatter back; dropped tokens leave this layer exactly as they came.
        out = scatter_tokens(x, idx, y)                                   # [B, N, D]
        # The inf/NaN check looks at the new values only (dropped tokens did not change), as one
        # sum: any inf or NaN makes it non-finite. Reading it on the host waits for a GPU.
        if self.cfg.check_values and not torch.isfinite(y.sum()):
            raise FloatingPointError(f"LFP layer {self.layer}: inf or NaN in the hidden states after scatter")
        if records is not None:
            records.append(LFPRecord(self.layer, idx.detach(), keep_prob.detach()))
        return out  # Phase 6: the next layer sees all N tokens again
        # --- exercise lfp_layer: end ---


# --- the schedule: which layers prune, and how much ------------------------------------

def shifted_cos_with_ratio(average: float, layer: int, n_layers: int) -> float:
    """The reference's keep ratio: high in shallow layers, low in deep ones, mean `average`."""
    # --- exercise schedule: begin ---
    return math.cos(layer * math.pi / (n_layers - 1)) / 2 + average
    # --- exercise schedule: end ---


def shifted_linear_with_ratio(average: float, layer: int, n_layers: int) -> float:
    return (-layer / (n_layers - 1) + 0.5) + average


# The seed names layers 5, 10, ..., 30 and prints token counts 227/207/179/140/115/102.
# Its printed ratios (0.85, 0.75, 0.60, 0.40, 0.30, 0.20) do not give those counts
# (0.75 x 192 = 144 -> 208 tokens; 0.30 x 192 = 57 -> 121), and neither does its own
# formula shifted_cos_with_ratio(0.5, l, 32), which gives 0.937, 0.764, 0.525, 0.280,
# 0.090, 0.003. These ratios are the ones whose int(192 x ratio) reproduces the counts:
# 163, 143, 115, 76, 51, 38 vision tokens kept (+ BOS, 20 text, 43 action = the counts).
SEED_SCHEDULE = {5: 0.85, 10: 0.745, 15: 0.60, 20: 0.40, 25: 0.266, 30: 0.20}
REFERENCE_SCHEDULE = "shiftedcos_decay_0.85_0.15"   # the public code's default


def lfp_schedule(cfg: CogVLAConfig) -> dict[int, float]:
    """{layer: ratio of vision tokens kept} for the config's schedule; raises on a bad one."""
    s, L = cfg.schedule, cfg.n_layers
    if isinstance(s, dict):
        table = dict(s)
    elif s == "seed":
        if L != 32:
            raise ValueError(f'schedule "seed" is defined for 32 layers, got n_layers={L}; use '
                             f'"shiftedcos_decay_0.85_0.15", "shiftedlinear_decay_0.85_0.15" or a '
                             f'{{layer: ratio}} dict')
        table = dict(SEED_SCHEDULE)
    elif isinstance(s, str) and (m := re.fullmatch(r"(shiftedcos|shiftedlinear)_decay_([\d.]+)_([\d.]+)", s)):
        kind, top, floor = m.group(1), float(m.group(2)), float(m.group(3))
        if not 0 < floor <= top <= 1:
            raise ValueError(f"schedule {s!r}: expected 0 < min <= max <= 1, got max={top}, min={floor}")
        curve = shifted_cos_with_ratio if kind == "shiftedcos" else shifted_linear_with_ratio
        # --- exercise schedule: begin ---
        # The reference's rule: a layer prunes where the curve is at or below `max`; the ratio is floored at `min`.
        table = {l: max(r, floor) for l in range(L) if (r := curve(cfg.lfp_average, l, L)) <= top}
        # --- exercise schedule: end ---
    else:
        raise ValueError(f'unknown schedule {s!r}: expected "seed", "shiftedcos_decay_<max>_<min>", '
                         f'"shiftedlinear_decay_<max>_<min>" or a {{layer: ratio}} dict')
    for layer, ratio in table.items():
        if not (isinstance(layer, int) and 0 <= layer < L):
            raise ValueError(f"LFP layer index must be an int in [0, {L}), got {layer!r}")
        if not 0 < ratio <= 1:
            raise ValueError(f"LFP ratio for layer {layer} must be in (0, 1], got {ratio!r}")
    return dict(sorted(table.items()))


# %% ====================================================================================
# The decoder
# ======================================================================================

class LlamaDecoder(nn.Module):
    """transformers' LlamaModel, with LFP layers where the schedule says. Without the
    `.router.` parameters its state dict has exactly LlamaModel's keys."""

    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        ratios = cfg.lfp_ratios                                           # derived on each read: read once
        self.layers = nn.ModuleList(
            LFPDecoderLayer(cfg, i) if i in ratios else DecoderLayer(cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, embeds, prune: bool = True, position_ids=None, records: list | None = None):
        """embeds [B, N, D] -> final-norm hidden states [B, N, D]. Pass a list as `records`
        to receive one LFPRecord per LFP layer that ran."""
        cfg = self.cfg
        B, N, D = embeds.shape
        ratios = cfg.lfp_ratios
        prune = prune and bool(ratios)
        if prune and cfg.attn_impl == "sdpa_causal":
            # Like flash-attention kernels, is_causal takes no mask; an LFP layer needs its
            # gathered one (the seed's FAQ: gather/scatter conflicts with flash-attn).
            raise ValueError('attn_impl="sdpa_causal" takes no mask, but an LFP layer needs its gathered mask '
                             '(the seed\'s FAQ: gather/scatter conflicts with flash-attn); use "sdpa" or '
                             '"math", or prune=False')
        if cfg.attn_impl == "sdpa_causal" and cfg.mask_kind != "causal":
            raise ValueError(f'attn_impl="sdpa_causal" can only be causal, got mask_kind={cfg.mask_kind!r}')
        built = {i: layer.ratio for i, layer in enumerate(self.layers) if isinstance(layer, LFPDecoderLayer)}
        if prune and built != ratios:
            raise ValueError(f"cfg.schedule was changed after this model was built: its LFP layers keep {built}, "
                             f"the config now says {ratios}; build a new model for the new schedule")
        if (prune or cfg.mask_kind == "catten") and N != cfg.seq_len:
            raise ValueError(f"LFP and catten need the config's layout: expected {cfg.seq_len} tokens, got {N}")
        all_tokens = torch.arange(N, device=embeds.device)[None]          # [1, N]
        mask = None if cfg.attn_impl == "sdpa_causal" else attention_mask(cfg, all_tokens)  # [1, 1, N, N]
        position_ids = all_tokens if position_ids is None else position_ids  # [1 or B, N]
        cos, sin = self.rotary_emb(position_ids, embeds.dtype)            # [1 or B, N, Dh]

        x = embeds
        for layer in self.layers:
            if prune and isinstance(layer, LFPDecoderLayer):
                x = layer.forward_lfp(x, position_ids, self.rotary_emb, records)
            else:
                x = layer(x, cos, sin, mask)                              # [B, N, D]
        return self.norm(x)


# %% ====================================================================================
# The vision tower: two ViTs with FiLM and aggregation tokens, projectors, MoE fusion
# ======================================================================================

class ViTBlock(nn.Module):
    """A pre-norm ViT block with FiLM between attention and MLP, conditioned on the instruction."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, d_cond: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.film_scale = nn.Linear(d_cond, width)  # gamma, zero-initialised: FiLM starts as identity
        self.film_shift = nn.Linear(d_cond, width)  # beta, zero-initialised
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x, cond):
        # --- exercise vit_film: begin ---
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d",
                            three=3, h=self.heads)                          # [B', h, n, d] each
        attn = F.scaled_dot_product_attention(q, k, v)                      # bidirectional, [B', h, n, d]
        x = x + self.proj(rearrange(attn, "b h n d -> b n (h d)"))          # [B', n, Dv]
        gamma, beta = self.film_scale(cond), self.film_shift(cond)          # [B', Dv] each
        x = x * (1 + gamma[:, None]) + beta[:, None]                        # [B', n, Dv]
        return x + self.mlp(self.norm2(x))
        # --- exercise vit_film: end ---


class ViT(nn.Module):
    """Patchify, embed, append aggregation tokens, run the FiLMed blocks, keep the aggregation tokens."""

    def __init__(self, cfg: CogVLAConfig, width: int, depth: int, heads: int):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.n_patches, width))
        self.agg_tokens = nn.Parameter(torch.zeros(cfg.n_agg_tokens, width)) if cfg.n_agg_tokens else None
        # The source reads the second-to-last block of each pretrained encoder; the last one
        # would never run, so `depth` counts only the blocks that do.
        self.blocks = nn.ModuleList(ViTBlock(width, heads, cfg.vit_mlp_ratio, cfg.d_model) for _ in range(depth))

    def forward(self, images, cond):
        p = self.cfg.patch_size
        patches = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)  # [B', P, 3 p p]
        x = self.patch_embed(patches) + self.pos_embed                                   # [B', P, Dv]
        if self.agg_tokens is not None:
            agg = self.agg_tokens.expand(x.shape[0], -1, -1)                              # [B', G, Dv]
            x = torch.cat([x, agg], dim=1)                                                # [B', P + G, Dv]
        for block in self.blocks:
            x = block(x, cond)
        if self.agg_tokens is not None:
            return x[:, self.cfg.n_patches:]   # [B', G, Dv] the aggregation tokens summarise the image
        return x                               # [B', P, Dv] patch mode: every patch is a token


def sincos_2d(side: int, width: int):
    """[side * side, width]: sines and cosines of row and column at geometric frequencies."""
    n_freq = width // 4
    freqs = 1.0 / 100 ** (torch.arange(n_freq) / max(1, n_freq - 1))         # [width/4]
    row, col = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    angles = [rearrange(c, "h w -> (h w) 1").float() * freqs for c in (row, col)]  # 2 x [P, width/4]
    code = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # [P, 4 (width/4)]
    return F.pad(code, (0, width - code.shape[1]))                                # [P, width]


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
        # --- exercise fusion: begin ---
        weights = repeat(self.fusion(instruction).softmax(-1), "b e -> (b i) e", i=n_img)  # [B I, 2]
        fused = weights[:, 0, None, None] * dino + weights[:, 1, None, None] * siglip      # [B I, G, D]
        # --- exercise fusion: end ---
        return rearrange(fused, "(b i) g d -> b (i g) d", i=n_img)                # [B, V, D]


# %% ====================================================================================
# CogVLA: vision tower + LLM with LFP + action head, one forward pass for the whole chunk
# ======================================================================================

@dataclass
class CogVLAOutput:
    actions: torch.Tensor                 # [B, chunk_len, action_dim]
    loss: torch.Tensor | None             # L1 against the given actions, else None
    lfp: list[LFPRecord] = field(default_factory=list)  # one per LFP layer that ran
    vision_tokens: torch.Tensor | None = None  # [B, V, D] the vision tokens the LLM received (for probes)


class CogVLA(nn.Module):
    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.vision = VisionTower(cfg)
        self.llm = LlamaDecoder(cfg)
        # The action segment (OFT-style): one token per state value, one query per action value.
        self.state_proj = nn.Linear(1, d)
        self.state_embed = nn.Parameter(torch.zeros(cfg.n_state, d))     # which state value this is
        self.action_queries = nn.Parameter(torch.zeros(cfg.n_queries, d))
        self.action_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.reset_parameters()

    def reset_parameters(self):
        """All initialisation in one place."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # std 1/sqrt(fan_in) keeps activations at unit scale through every layer: at
                # d_model 4096 it is 0.016, close to Llama's 0.02; at tiny widths 0.02 would
                # shrink each layer's output ~8x and stall training.
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                # The same rule with fan-in 1 (a one-hot input): unit scale. Both FiLMs read the
                # instruction as the mean of these embeddings, and at Llama's 0.02 that signal
                # would be ~50x weaker than the image features it modulates.
                nn.init.normal_(module.weight, std=1.0)
        # Which state value a token carries. Not small: the first layer reads each token through
        # RMSNorm, which maps state_proj(s) = s * w (its bias starts at 0) to +-w / rms(w) and so
        # erases the value's size; only the embedding added beside it lets norm(s * w + e) turn
        # with s. At 0.02 the toy trainer's loss stayed at ~0.28 (about what the gripper value
        # alone gives) for 100-150 steps; at 1 the embedding starts to drown the value. (README:
        # what was tried; test_state_value_survives_the_first_norm_at_init.)
        nn.init.normal_(self.state_embed, std=0.3)
        # Queries that predict the same action value (dx at every chunk step, say) start alike,
        # so where to look, once one of them learns it, is learned for all ten; a difference of
        # 2% lets them part later. Small (0.02; README: what was tried).
        per_value = 0.02 * torch.randn(self.cfg.action_dim, self.cfg.d_model)          # [A, D]
        per_query = repeat(per_value, "a d -> (c a) d", c=self.cfg.chunk_len)           # [C A, D] as the head reads them
        self.action_queries.data.copy_(per_query + 0.02 * 0.02 * torch.randn_like(per_query))
        for vit in (self.vision.dino, self.vision.siglip):
            # Pretrained encoders know where each patch is; ours start from a 2-D sin-cos code of
            # (row, column) so that position is readable from step 0 (it still trains).
            vit.pos_embed.data.copy_(sincos_2d(self.cfg.image_size // self.cfg.patch_size, vit.pos_embed.shape[1]))
            if vit.agg_tokens is not None:
                nn.init.normal_(vit.agg_tokens, std=0.02)
            for block in vit.blocks:                        # FiLM starts as identity: gamma = beta = 0
                for film in (block.film_scale, block.film_shift):
                    nn.init.zeros_(film.weight)
                    nn.init.zeros_(film.bias)
        nn.init.zeros_(self.vision.fusion[-1].weight)       # fusion starts as an equal mix of the encoders
        for layer in self.llm.layers:
            if not isinstance(layer, LFPDecoderLayer):
                continue
            # The router starts generous and nearly indifferent: keep probability ~0.88 for every
            # token (+2 on the "keep" logit), small weights only to break ties. Its probability
            # scales each kept token's MLP output (Phase 4); at 1/sqrt(fan_in) it spread from 0.1
            # to 0.9, and all ten queries of one action value could start with their MLPs at a
            # tenth of their strength in one layer and a third in the next.
            nn.init.normal_(layer.router.score.weight, std=0.1 * self.cfg.d_model ** -0.5)
            layer.router.score.bias.data.copy_(torch.tensor([0.0, 2.0]))    # [drop, keep]
            if self.cfg.router_film:
                for mlp in (layer.router.film_scale, layer.router.film_shift):
                    nn.init.zeros_(mlp[-1].weight)          # router FiLM starts as identity too
                    nn.init.zeros_(mlp[-1].bias)

    def check_inputs(self, images, text_ids, state, actions):
        cfg = self.cfg
        want_img = (cfg.n_images, 3, cfg.image_size, cfg.image_size)
        if images.dim() != 5 or tuple(images.shape[1:]) != want_img:
            raise ValueError(f"images: expected [B, {', '.join(map(str, want_img))}], got {list(images.shape)}")
        if text_ids.dim() != 2 or text_ids.shape[1] != cfg.n_text:
            raise ValueError(f"text_ids: expected [B, {cfg.n_text}] (pad or truncate), got {list(text_ids.shape)}")
        if text_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"text_ids: expected integer token ids, got dtype {text_ids.dtype}")
        if cfg.check_values:   # each reads a value back from the device: cfg.check_values=False skips them
            lo, hi = int(text_ids.min()), int(text_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"text_ids: expected ids in [0, {cfg.vocab_size}), got values in [{lo}, {hi}]")
            for name, t in (("images", images), ("state", state)):
                if not torch.isfinite(t).all():
                    raise ValueError(f"{name}: expected finite values, got {int((~torch.isfinite(t)).sum())} "
                                     f"inf or NaN")
        if state.dim() != 2 or state.shape[1] != cfg.n_state:
            raise ValueError(f"state: expected [B, {cfg.n_state}], got {list(state.shape)}")
        want_act = (cfg.chunk_len, cfg.action_dim)
        if actions is not None and (actions.dim() != 3 or tuple(actions.shape[1:]) != want_act):
            raise ValueError(f"actions: expected [B, {cfg.chunk_len}, {cfg.action_dim}], got {list(actions.shape)}")
        batch = {"images": images.shape[0], "text_ids": text_ids.shape[0], "state": state.shape[0]}
        if actions is not None:
            batch["actions"] = actions.shape[0]
        if len(set(batch.values())) != 1:
            raise ValueError(f"batch sizes disagree: {batch}")

    def embed(self, images, text_ids, state):
        """Build the LLM's input sequence [B, N, D]: [BOS] [vision] [text] [state] [queries]."""
        B = text_ids.shape[0]
        text = self.llm.embed_tokens(text_ids)                              # [B, T, D]
        vision = self.vision(images, text.mean(dim=1))                      # [B, V, D]
        bos = self.llm.embed_tokens.weight[self.cfg.bos_id].expand(B, 1, -1)  # [B, 1, D]
        state_tokens = self.state_proj(state[..., None]) + self.state_embed  # [B, 3, D]
        queries = self.action_queries.expand(B, -1, -1)                     # [B, 40, D]
        return torch.cat([bos, vision.to(text.dtype), text, state_tokens, queries], dim=1)  # [B, N, D]

    def forward(self, images, text_ids, state, actions=None, prune: bool = True) -> CogVLAOutput:
        self.check_inputs(images, text_ids, state, actions)
        cfg, records = self.cfg, []
        embeds = self.embed(images, text_ids, state)                        # [B, N, D]
        hidden = self.llm(embeds, prune=prune, records=records)             # [B, N, D]
        queries = hidden[:, -cfg.n_queries:]                                # [B, 40, D]
        pred = rearrange(self.action_head(queries), "b (c a) 1 -> b c a", c=cfg.chunk_len)  # [B, 10, 4]
        loss = F.l1_loss(pred.float(), actions.float()) if actions is not None else None
        return CogVLAOutput(pred, loss, records, vision_tokens=embeds[:, cfg.vision_start:cfg.text_start])

    def example_inputs(self, batch_size: int = 2, seed: int = 0):
        """Valid random (images, text_ids, state, actions) on the model's device."""
        cfg, g = self.cfg, torch.Generator().manual_seed(seed)
        images = torch.rand(batch_size, cfg.n_images, 3, cfg.image_size, cfg.image_size, generator=g)
        text_ids = torch.randint(0, cfg.vocab_size, (batch_size, cfg.n_text), generator=g)
        state = torch.rand(batch_size, cfg.n_state, generator=g) * 2 - 1
        actions = torch.rand(batch_size, cfg.chunk_len, cfg.action_dim, generator=g) * 2 - 1
        device = self.llm.embed_tokens.weight.device
        return tuple(t.to(device) for t in (images, text_ids, state, actions))


# %% ====================================================================================
# Accounting: what a schedule costs, per layer, at any size
# ======================================================================================

@dataclass
class LayerCost:
    layer: int
    tokens: int           # tokens this layer's block processes
    lfp: bool             # an LFP layer (pays for its router)
    attn_n2d: float       # N^2 x D, the seed's per-layer attention figure
    attn_flops: float     # 4 N^2 D: QK^T and AV, 2 FLOPs per multiply-add
    linear_flops: float   # 2 x tokens x (q, k, v, o, gate, up, down weights)
    router_flops: float   # router matmuls: score on all N tokens (and again on the FiLMed vision ones), FiLM MLPs
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
    left out; the router is counted. `pruning_persists=True` is the seed's figure's assumption
    (standard layers run on the last LFP layer's K), which its own scatter design contradicts."""
    N, D, F_, L = cfg.seq_len, cfg.d_model, cfg.d_ff, cfg.n_layers
    d_kv = cfg.n_kv_heads * cfg.head_dim
    weights = D * D + 2 * D * d_kv + D * D + 3 * D * F_               # q, k, v, o, gate, up, down

    def cost(layer, tokens, lfp):
        router = 0.0
        if lfp:
            router = 2 * N * D * 2                                     # score Linear(D, 2) on all N
            if cfg.router_film:   # the FiLMed vision tokens are scored again; 2 MLPs D -> D/2 -> D on the text mean
                router += 2 * cfg.n_vision * D * 2 + 2 * 2 * (D * (D // 2) + (D // 2) * D)
        return LayerCost(layer, tokens, lfp, float(tokens ** 2 * D), 4.0 * tokens ** 2 * D * batch_size,
                         2.0 * tokens * weights * batch_size, router * batch_size,
                         2.0 * tokens * d_kv * bytes_per_value * batch_size)

    layers, current, ratios = [], N, cfg.lfp_ratios
    for l in range(L):
        if l in ratios:
            current = n_kept_tokens(cfg, ratios[l])
            layers.append(cost(l, current, True))
        else:
            layers.append(cost(l, current if pruning_persists else N, False))
    return Accounting(layers, [cost(l, N, False) for l in range(L)])


# %% ====================================================================================
# Walkthrough: `python cogvla_mini.py`
# ======================================================================================

def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_report(model: CogVLA) -> dict[str, int]:
    routers = sum(count_parameters(l.router) for l in model.llm.layers if isinstance(l, LFPDecoderLayer))
    v = model.vision
    return {
        "vision: DINOv2-like ViT": count_parameters(v.dino),
        "vision: SigLIP-like ViT": count_parameters(v.siglip),
        "vision: projectors + fusion": count_parameters(v.dino_proj) + count_parameters(v.siglip_proj)
        + count_parameters(v.fusion),
        "llm: Llama decoder (no routers)": count_parameters(model.llm) - routers,
        "llm: LFP routers (with FiLM)": routers,
        "action segment + head": sum(p.numel() for n, p in model.named_parameters()
                                     if n.startswith(("state_", "action_"))),
    }


def walkthrough():
    torch.manual_seed(0)
    full = CogVLAConfig.seed()
    for schedule in ("seed", REFERENCE_SCHEDULE):
        cfg = CogVLAConfig.tiny(schedule=schedule)
        model = CogVLA(cfg).eval()
        images, text_ids, state, _ = model.example_inputs(batch_size=2)
        with torch.no_grad():
            out = model(images, text_ids, state)
        processed = {r.layer: r.kept_indices.shape[1] for r in out.lfp}   # read from the pass
        acc = account(CogVLAConfig.seed(schedule=schedule))
        print(f"\n=== schedule {schedule!r}: tiny model forward (D={cfg.d_model}), seed-size costs "
              f"(D={full.d_model}) ===")
        print(f"{'layer':>5} {'tokens (pass)':>13} {'vision kept':>11} {'N^2*D (M)':>10} "
              f"{'linear GFLOP':>12} {'KV MiB':>7}")
        for c in acc.layers:
            n = processed.get(c.layer, cfg.seq_len)
            vis = n - (cfg.seq_len - cfg.n_vision)
            tag = " LFP" if c.layer in processed else ""
            print(f"{c.layer:>5} {n:>13} {vis:>11} {c.attn_n2d / 1e6:>10.0f} {c.linear_flops / 1e9:>12.2f} "
                  f"{c.kv_bytes / 2**20:>7.2f}{tag}")
        print(f"tokens processed: {acc.token_share:.1%} of dense | attention N^2*D: "
              f"{acc.total('attn_n2d') / 1e9:.2f} G vs dense {acc.total('attn_n2d', True) / 1e9:.2f} G | "
              f"KV: {acc.total('kv_bytes') / 2**20:.0f} MiB vs {acc.total('kv_bytes', True) / 2**20:.0f} MiB "
              f"(fp16, per sample) | FLOP-bound speedup {acc.speedup_bound:.3f}x")
        if schedule == "seed":
            seed_fig = account(CogVLAConfig.seed(), pruning_persists=True)
            print(f"the seed's figure assumes pruning persists between LFP layers: {seed_fig.total('attn_n2d') / 1e9:.2f}"
                  f" G N^2*D (it prints 5.12 G), {seed_fig.total('attn_n2d', True) / seed_fig.total('attn_n2d'):.2f}x;"
                  f" its own scatter (Phase 6) gives {acc.total('attn_n2d', True) / acc.total('attn_n2d'):.2f}x")
    print("\n=== parameters (tiny preset, seed schedule: 6 routers) ===")
    for name, n in parameter_report(CogVLA(CogVLAConfig.tiny())).items():
        print(f"{name:<34} {n:>10,}")


if __name__ == "__main__":
    walkthrough()
