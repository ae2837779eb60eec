"""Executable claims about cogvla_mini.py. Seconds on a CPU; the
device-parametrised ones run on CUDA too when there is one."""

import dataclasses
import functools
import inspect
import math
import sys
import textwrap

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cogvla_mini as cm
import exercises
from cogvla_mini import CogVLA, CogVLAConfig
from conftest import randomize_films
from exercises import Case, assert_close

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA device"))]
SOURCE_LAYERS = [5, 10, 15, 20, 25, 30]
SOURCE_COUNTS = [227, 207, 179, 140, 115, 102]   # the source's token counts


# =============================================================================== helpers

def make_model(device="cpu", seed=0, **overrides):
    torch.manual_seed(seed)
    return CogVLA(CogVLAConfig.tiny(**overrides)).to(device).eval()


@pytest.fixture(scope="module")
def tiny():
    return make_model()


# Every expected value below is computed from the formula, in float64, with explicit loops over
# heads and positions, without the helpers under test (rotate_half, apply_rope, attention_mask,
# select, gather/scatter, RMSNorm): a one-line slip in any of them changes a result here, with
# or without transformers installed. Weights are copied from the model's modules.
# Precision: like transformers' Llama, the model normalises (RMSNorm), computes RoPE angles and
# (attn_impl "math") takes the softmax in float32 even for float64 inputs. Pieces without those
# are compared at 1e-10; anything through them at 2e-5 (observed error ~1e-6; every planted bug
# moved the output by far more).
TOL64 = 1e-10   # float64 end to end
TOL32 = 2e-5    # through the float32 norm / RoPE angles / softmax (observed error ~1e-6)


def small(**overrides):
    """The source's structure at a tiny layout, as overrides of CogVLAConfig.tiny():
    N = 1 + 16 vision + 6 text + 2 state + 12 queries = 37."""
    base = dict(n_layers=2, schedule={1: 0.3}, n_heads=4, n_kv_heads=2, n_images=2, n_agg_tokens=8,
                n_text=6, n_state=2, chunk_len=3, action_dim=4)
    return {**base, **overrides}


def small_cfg(**overrides):
    return cm.CogVLAConfig.tiny(**small(**overrides))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0):
    """float64, of values float32 can hold: a handout stores them in half the bytes (compressed)."""
    return torch.randn(*shape, generator=gen(seed)).double() * scale


def randomize_(module, seed, std=0.3):
    """Fill every parameter of `module` with non-zero random values (float64 module)."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)     # float32 values: see randn
    return module


def ref_linear(lin, x):
    y = x @ lin.weight.double().T
    return y if lin.bias is None else y + lin.bias.double()


def make_llm(cfg, seed=0):
    torch.manual_seed(seed)
    llm = cm.LlamaDecoder(cfg).double()
    g = gen(seed + 100)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))  # not all ones
        for i, layer in enumerate(llm.layers):
            if isinstance(layer, cm.LFPDecoderLayer):
                randomize_router_(layer.router, seed + 110 + i)
    return llm


def randomize_router_(router, seed):
    """Router FiLM (zero-initialised) and score with unit-scale random weights: logits O(1), so
    the keep probabilities spread over (0, 1) without saturating into ties."""
    g = gen(seed)
    lins = [router.score] + ([m[i] for m in (router.film_scale, router.film_shift) for i in (0, 2)]
                             if hasattr(router, "film_scale") else [])
    with torch.no_grad():
        for lin in lins:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=lin.weight.dtype) / lin.in_features ** 0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=lin.bias.dtype) * 0.1)
    return router


# =============================================================================== config, layout, shapes, bad input

@pytest.mark.parametrize("device", DEVICES)
def test_every_stage_has_the_documented_shape(device):
    model = make_model(device)
    cfg = model.cfg
    images, text_ids, state, actions = model.example_inputs(batch_size=3)
    text = model.llm.embed_tokens(text_ids)
    assert model.vision(images, text.mean(1)).shape == (3, 192, cfg.d_model)
    embeds = model.embed(images, text_ids, state)
    assert embeds.shape == (3, 256, cfg.d_model)
    assert model.llm(embeds).shape == (3, 256, cfg.d_model)
    out = model(images, text_ids, state, actions)
    assert out.actions.shape == (3, 10, 4)
    assert out.loss.dim() == 0 and out.loss.item() > 0
    assert model(images, text_ids, state).loss is None


def test_patch_mode_uses_every_patch_as_a_vision_token():
    model = make_model(n_agg_tokens=0, schedule={2: 0.5}, n_layers=4)
    cfg = model.cfg
    assert cfg.n_vision == 3 * (28 // 7) ** 2 == 48
    images, text_ids, state, actions = model.example_inputs(batch_size=2)
    out = model(images, text_ids, state, actions)
    assert out.actions.shape == (2, 10, 4)
    assert out.lfp[0].kept_indices.shape[1] == cfg.seq_len - 24   # half of 48 vision tokens dropped


def test_example_inputs_are_valid_and_deterministic(tiny):
    a, b = tiny.example_inputs(2, seed=3), tiny.example_inputs(2, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    tiny.check_inputs(*a)   # raises if not valid


def bad(model, what):
    images, text_ids, state, actions = model.example_inputs(batch_size=2)
    cfg = model.cfg
    if what == "image count":
        images = images[:, :2]
    elif what == "image size":
        images = torch.rand(2, 3, 3, 32, 32)
    elif what == "text length":
        text_ids = text_ids[:, :19]
    elif what == "token id":
        text_ids[0, 0] = cfg.vocab_size
    elif what == "negative token id":
        text_ids[1, 3] = -1
    elif what == "float text":
        text_ids = text_ids.float()
    elif what == "state shape":
        state = state[:, :2]
    elif what == "action shape":
        actions = actions[:, :9]
    elif what == "batch sizes":
        state = state[:1]
    elif what == "nan image":
        images[1, 2, 0, 5, 5] = float("nan")
    elif what == "inf state":
        state[0, 1] = float("inf")
    return images, text_ids, state, actions


@pytest.mark.parametrize("what, message", [
    ("image count", r"images: expected \[B, 3, 3, 28, 28\], got \[2, 2, 3, 28, 28\]"),
    ("image size", r"images: expected .*got \[2, 3, 3, 32, 32\]"),
    ("text length", r"text_ids: expected \[B, 20\].*got \[2, 19\]"),
    ("token id", r"ids in \[0, 256\), got values in \[\d+, 256\]"),
    ("negative token id", r"ids in \[0, 256\), got values in \[-1, "),
    ("float text", r"integer token ids, got dtype torch.float32"),
    ("state shape", r"state: expected \[B, 3\], got \[2, 2\]"),
    ("action shape", r"actions: expected \[B, 10, 4\], got \[2, 9, 4\]"),
    ("batch sizes", r"batch sizes disagree: .*'state': 1"),
    ("nan image", r"images: expected finite values, got 1 inf or NaN"),
    ("inf state", r"state: expected finite values, got 1 inf or NaN"),
])
def test_bad_input_gets_a_value_error_saying_what_was_expected(tiny, what, message):
    with pytest.raises(ValueError, match=message):
        tiny(*bad(tiny, what))


@pytest.mark.parametrize("overrides, message", [
    (dict(schedule="cosine"), "unknown schedule 'cosine'"),
    (dict(schedule="shiftedcos_decay_0.15_0.85"), "0 < min <= max <= 1"),
    (dict(schedule={5: 0.0}), r"ratio for layer 5: expected one in \(0, 1\], got 0.0"),
    (dict(schedule={5: 1.5}), r"ratio for layer 5: expected one in \(0, 1\], got 1.5"),
    (dict(schedule={32: 0.5}), r"LFP layer index: expected an int in \[0, 32\), got 32"),
    (dict(schedule={-1: 0.5}), r"got -1"),
    (dict(n_layers=8), 'schedule "source": expected 32 layers \\(else use "shiftedcos_decay.*got n_layers=8'),
    (dict(attn_impl="flash"), r"expected attn_impl one of \('math', 'sdpa', 'sdpa_causal'\), got 'flash'"),
    (dict(mask_kind="bidirectional"), r"expected mask_kind one of \('causal', 'catten'\), got 'bidirectional'"),
    (dict(position_mode="absolute"), r"expected position_mode one of \('reindex', 'original'\), got 'absolute'"),
    (dict(d_model=66), "d_model divisible by n_heads"),
    (dict(image_size=30), "image_size divisible by patch_size"),
], ids=["unknown-name", "min-above-max", "ratio-0", "ratio-1.5", "layer-32", "layer-minus-1", "source-needs-32-layers",
        "attn_impl", "mask_kind", "position_mode", "d_model", "image_size"])   # ids without exercise names (-k)
def test_bad_config_gets_a_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        CogVLAConfig.tiny(**overrides)


# =============================================================================== Llama pieces, each beside its naive reference


# ----------------------------------------------------------------------------- RMSNorm

def ref_rmsnorm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps), in float32, cast back to x's dtype, then times the weight."""
    x32 = x.to(torch.float32)
    normed = x32 / torch.sqrt((x32 * x32).sum(-1, keepdim=True) / x32.shape[-1] + eps)
    return weight * normed.to(x.dtype)


@pytest.mark.exercise("rmsnorm")
def test_rmsnorm_is_x_over_sqrt_mean_square_plus_eps_times_weight(check):
    w = randn(24, seed=1) + 1
    cases = []
    for eps in (1e-5, 0.1):
        for scale in (1.0, 1e-2):   # at 1e-2 the mean square (1e-4) is comparable to eps: its place matters
            x = randn(3, 5, 24, seed=2, scale=scale)
            ms = (x ** 2).mean(-1, keepdim=True)
            # Outputs are O(1) and normalised in float32 (relative error ~1e-7): 1e-5 is float32's room.
            cases.append(Case(f"RMSNorm(24, eps={eps}) on x of scale {scale}", exercises.call_rmsnorm,
                              dict(x=x, weight=w, eps=eps), {"out": w * (x / torch.sqrt(ms + eps))},
                              {"out": 1e-5}, dtypes={"out": "torch.float64"}, mistakes={
                "eps outside the square root, x / (sqrt(mean(x^2)) + eps)": {"out": w * x / (ms.sqrt() + eps)},
                "the mean over the wrong dim (not the last)":
                    {"out": w * x / torch.sqrt((x ** 2).mean(-2, keepdim=True) + eps)},
                "the weight left out": {"out": x / torch.sqrt(ms + eps)},
                "a sum of squares where their mean is meant":
                    {"out": w * x / torch.sqrt((x ** 2).sum(-1, keepdim=True) + eps)}}))
    check(*cases)


@pytest.mark.exercise("rmsnorm")
def test_rmsnorm_on_bf16_normalises_in_float32_and_casts_back_before_the_weight(check):
    w = (1 + randn(64, seed=3)).to(torch.bfloat16)
    x = (randn(4, 9, 64, seed=4) * 3).to(torch.bfloat16)
    x32 = x.float()
    normed = x32 / torch.sqrt((x32 ** 2).mean(-1, keepdim=True) + 1e-5)
    in_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)            # every step in bf16
    # float32 rsqrt vs 1/sqrt may move a float32 value by an ulp, which can flip a bf16 rounding, rarely:
    # up to 3 of 2304 values may differ. A weight applied before the cast (double rounding) changes ~10%.
    check(Case(f"RMSNorm(64) on bf16 x {list(x.shape)}: weight * bf16(float32-normalised x), elementwise",
               exercises.call_rmsnorm, dict(x=x, weight=w, eps=1e-5), {"out": w * normed.to(torch.bfloat16)}, {"out": 0.0},
               dtypes={"out": "torch.bfloat16"}, allowed_off=3, mistakes={
        "the weight applied before the cast back to bf16": {"out": (w.float() * normed).to(torch.bfloat16)},
        "normalised in bf16, not float32": {"out": w * in_bf16}}))


# ----------------------------------------------------------------------------- RoPE

def ref_inv_freq(head_dim, theta):
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    return theta ** (-2.0 * i / head_dim)                                      # [Dh/2]


def ref_rope(x, positions, theta):
    """Rotate each pair (i, i + Dh/2) of x [..., N, Dh] as a complex number by positions * inv_freq."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())         # [..., N, Dh/2]
    angle = positions.double()[:, None] * ref_inv_freq(x.shape[-1], theta)     # [N, Dh/2]
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def float64_cos_sin(positions, head_dim, theta):
    angle = positions.double()[..., None] * ref_inv_freq(head_dim, theta)
    return torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)


@pytest.mark.exercise("rope")
def test_rotary_cos_sin_are_position_times_theta_pow_minus_2i_over_dh_in_rotate_half_layout(check):
    cfg = small_cfg()
    pos = torch.tensor([[0, 1, 2, 7, 30, 36], [5, 0, 3, 3, 11, 1]])
    angle = pos.double()[..., None] * ref_inv_freq(cfg.head_dim, cfg.rope_theta)   # [B, N, Dh/2]
    wrong_exp = pos.double()[..., None] * cfg.rope_theta ** (-torch.arange(cfg.head_dim // 2) / cfg.head_dim)

    def layout(f, a):
        return torch.cat([f(a), f(a)], -1)
    # Angles up to 36 rad in float32 (ulp ~4e-6): 1e-5 is float32's room, far below any mistake.
    check(Case(f"RotaryEmbedding(head_dim={cfg.head_dim}) cos and sin (float32 angles)", exercises.call_rope_cos_sin,
               dict(head_dim=cfg.head_dim, theta=cfg.rope_theta, position_ids=pos, dtype="float64"),
               {"cos": layout(torch.cos, angle), "sin": layout(torch.sin, angle)}, {"cos": 1e-5, "sin": 1e-5},
               dtypes={"cos": "torch.float64", "sin": "torch.float64"}, mistakes={
        "cos and sin swapped": {"cos": layout(torch.sin, angle), "sin": layout(torch.cos, angle)},
        "each frequency repeated in place (repeat_interleave), not cat([freqs, freqs])":
           {"cos": angle.cos().repeat_interleave(2, -1), "sin": angle.sin().repeat_interleave(2, -1)},
        "theta^(-i/Dh) instead of theta^(-2i/Dh)":
           {"cos": layout(torch.cos, wrong_exp), "sin": layout(torch.sin, wrong_exp)}}))


@pytest.mark.exercise("rope")
def test_apply_rope_is_a_complex_rotation_of_pairs_i_and_i_plus_half(check):
    B, H, N, Dh = 2, 3, 7, 16
    x = randn(B, H, N, Dh, seed=5)
    pos = torch.tensor([[0, 1, 2, 3, 9, 20, 41], [3, 3, 0, 8, 1, 2, 100]])
    cos, sin = float64_cos_sin(pos, Dh, 10000.0)
    x1, x2 = x[..., :Dh // 2], x[..., Dh // 2:]
    evens, odds = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None], sin[:, None]
    want = torch.stack([ref_rope(x[b], pos[b], 10000.0) for b in range(B)])
    check(Case("apply_rope", exercises.call_apply_rope, dict(x=x, cos=cos, sin=sin), {"out": want}, {"out": TOL64}, mistakes={
        "rotate_half with the minus on the wrong half, cat([x2, -x1])": {"out": x * c + torch.cat([x2, -x1], -1) * s},
        "rotate_half without the minus, cat([x2, x1])": {"out": x * c + torch.cat([x2, x1], -1) * s},
        "neighbours (2i, 2i+1) paired instead of halves (i, i + Dh/2)":
           {"out": x * c + torch.stack([-odds, evens], -1).flatten(-2) * s},
        "cos and sin swapped": {"out": x * s + torch.cat([-x2, x1], -1) * c}}))


@pytest.mark.exercise("rope")
def test_rope_score_depends_only_on_the_position_offset(check):
    """q.k after RoPE at positions (m, n) is the reference's rotation, so it depends on m - n only:
    (7, 3), (107, 103) and (4, 0) give one score, (7, 4) another."""
    torch.manual_seed(5)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    pairs = torch.tensor([[7, 3], [107, 103], [4, 0], [7, 4]])
    want = torch.stack([(ref_rope(q[0, 0], torch.tensor([m]), 1e4) * ref_rope(k[0, 0], torch.tensor([n]), 1e4)).sum()
                        for m, n in pairs.tolist()])
    assert abs(want[0] - want[1]) < 1e-9 and abs(want[0] - want[2]) < 1e-9 and abs(want[0] - want[3]) > 1e-3
    # RoPE in float32 at positions up to 107: 1e-4 is float32's room for a sum of 16 products.
    check(Case("q.k after RoPE for the position pairs (7, 3), (107, 103), (4, 0), (7, 4)", exercises.call_rope_scores,
               dict(q=q, k=k, pairs=pairs, head_dim=16, theta=10000.0), {"scores": want}, {"scores": 1e-4}))


@pytest.mark.exercise("rope")
def test_rope_stays_float32_inside_a_bf16_model(check):
    cfg = dict(d_model=256, n_heads=2, n_kv_heads=2, n_layers=1, schedule={})   # head dim 128, as at full size
    pos = torch.arange(0, 256, 8)[None]                                           # far positions among them
    inv_freq = 10000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    angles = (pos[..., None].double() * inv_freq).repeat(1, 1, 2)               # [1, N, Dh] float64
    bf16 = torch.bfloat16                       # the mistake: every step in the dtype asked for
    rounded = pos.to(bf16)[..., None] * (1.0 / 10000.0 ** (torch.arange(0, 128, 2, dtype=bf16) / 128))
    rounded = torch.cat([rounded, rounded], -1)
    # Only the final cast may round: bf16 keeps 8 bits, so |error| <= 2^-8 of a value <= 1.
    check(Case("cos and sin of a bf16 model's RotaryEmbedding, against float64 angles", exercises.call_rope_in_bf16_model,
               dict(cfg=cfg, position_ids=pos), {"cos": angles.cos(), "sin": angles.sin()},
               {"cos": 2 ** -8, "sin": 2 ** -8}, dtypes={"cos": "torch.bfloat16", "sin": "torch.bfloat16"},
               mistakes={"the frequencies and angles computed in bf16 (compute them in float32, cast at the end)":
                         {"cos": rounded.cos(), "sin": rounded.sin()}}))


# ----------------------------------------------------------------------------- masks

def ref_may_attend(cfg, q_pos, k_pos):
    """Sequence positions q_pos (query) may see k_pos (key)?"""
    if k_pos <= q_pos:
        return True
    return cfg.mask_kind == "catten" and q_pos >= cfg.action_start and k_pos >= cfg.action_start


def naive_bool_mask(cfg, token_positions):
    B, K = token_positions.shape
    m = torch.zeros(B, 1, K, K, dtype=torch.bool)
    for b in range(B):
        for i in range(K):
            for j in range(K):
                m[b, 0, i, j] = ref_may_attend(cfg, int(token_positions[b, i]), int(token_positions[b, j]))
    return m


@pytest.mark.exercise("causal_mask")
def test_causal_mask_is_causal_plus_action_segment_both_ways(check):
    idx = torch.tensor([[0, 3, 16, 17, 22, 23, 24, 30, 36], [0, 1, 2, 20, 21, 23, 25, 26, 35]])
    cases = []
    for mask_kind in ("causal", "catten"):
        cfg = small_cfg(mask_kind=mask_kind)
        want = naive_bool_mask(cfg, idx)
        mistakes = {"mask transposed (row = key, column = query: the future is visible)": {"mask": want.transpose(-1, -2)}}
        if mask_kind == "catten":   # on sorted indices, row numbers compared give the causal mask: the same output
            mistakes["the action segment left causal: mask_kind 'catten' ignored, or row and column numbers compared "
                     "where the positions they hold are meant"] = {"mask": naive_bool_mask(small_cfg(), idx)}
        cases.append(Case(f"attention_mask ({mask_kind}) on kept positions {idx.tolist()}, 1 = may attend",
                          exercises.call_attention_mask, dict(cfg=small(mask_kind=mask_kind), token_idx=idx), {"mask": want},
                          {"mask": 0}, dtypes={"mask": "torch.bool"}, mistakes=mistakes))
    check(*cases)


def test_catten_action_tokens_see_each_other_and_earlier_tokens_never_see_them():
    cfg = CogVLAConfig.tiny(mask_kind="catten")
    mask = cm.attention_mask(cfg, torch.arange(cfg.seq_len)[None])[0, 0]
    a = cfg.action_start
    assert mask[a:, a:].all()                     # both ways inside the action segment
    assert not mask[:a, a:].any()                 # nothing earlier sees it
    assert torch.equal(mask[:a, :a], torch.ones(a, a).tril().bool())  # vision and text stay causal
    # and in a real pass: the last action token now changes the first one's output
    model = make_model(mask_kind="catten")
    torch.manual_seed(3)
    embeds = torch.randn(1, 256, cfg.d_model)
    changed = embeds.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model.llm(embeds)[:, a], model.llm(changed)[:, a])


@pytest.mark.parametrize("mask_kind", ["causal", "catten"])
def test_gathered_mask_is_the_kept_rows_and_columns_of_the_full_mask(mask_kind):
    cfg = CogVLAConfig.tiny(mask_kind=mask_kind)
    full = cm.attention_mask(cfg, torch.arange(cfg.seq_len)[None])
    assert full.shape == (1, 1, 256, 256)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(256, generator=g)[:150].sort().values for _ in range(2)])
    built = cm.attention_mask(cfg, idx)           # what the LFP layer does: build it from the indices
    assert built.shape == (2, 1, 150, 150)
    for b in range(2):                            # the source's Phase 3: the kept rows, then columns
        kept = idx[b].tolist()
        expect = torch.tensor([[bool(full[0, 0, i, j]) for j in kept] for i in kept])
        assert torch.equal(built[b, 0], expect)


# ----------------------------------------------------------------------------- attention

def ref_attention(attn, x, rope_positions, token_positions, cfg, gqa="consecutive", softmax_over="keys",
                  scale=None):
    """Explicit loops over batch, heads and query positions. x [B, N, D] float64; rope_positions
    [B, N] the positions RoPE uses; token_positions [B, N] the sequence positions the mask uses.
    Classic mistakes: gqa="strided" (query head h on key/value head h % n_kv_heads),
    softmax_over="queries" (each key's scores normalised over the queries), scale=D (scores
    divided by sqrt(D) instead of sqrt(Dh))."""
    B, N, D = x.shape
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
    Wq, Wk, Wv, Wo = (m.weight.detach().double() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    out = torch.zeros(B, N, H * Dh, dtype=torch.float64)
    for b in range(B):
        tok = token_positions[b].tolist()
        allowed = torch.tensor([[ref_may_attend(cfg, tok[i], tok[j]) for j in range(N)] for i in range(N)])
        for h in range(H):
            kvh = h // (H // Hkv) if gqa == "consecutive" else h % Hkv        # GQA: consecutive query heads share
            q = x[b] @ Wq[h * Dh:(h + 1) * Dh].T                               # [N, Dh]
            k = x[b] @ Wk[kvh * Dh:(kvh + 1) * Dh].T
            v = x[b] @ Wv[kvh * Dh:(kvh + 1) * Dh].T
            q = ref_rope(q, rope_positions[b], cfg.rope_theta)
            k = ref_rope(k, rope_positions[b], cfg.rope_theta)
            scores = q @ k.T / math.sqrt(scale or Dh)                          # [N queries, N keys]
            e = torch.where(allowed, torch.exp(scores - scores.max()), 0.0)    # exp, 0 where not allowed
            probs = e / e.sum(dim=1 if softmax_over == "keys" else 0, keepdim=True)
            out[b, :, h * Dh:(h + 1) * Dh] = probs @ v
    return out @ Wo.T


@pytest.mark.exercise("attention")
def test_attention_matches_per_head_loops_with_gqa_h_over_group(check):
    cases = []
    for mask_kind in ("causal", "catten"):
        for attn_impl in ("math", "sdpa"):
            over = small(mask_kind=mask_kind, attn_impl=attn_impl)
            cfg = cm.CogVLAConfig.tiny(**over)
            torch.manual_seed(0)
            attn = cm.Attention(cfg).double()
            x = randn(2, cfg.seq_len, cfg.d_model, seed=6)
            pos = torch.arange(cfg.seq_len)[None].expand(2, -1)
            cos, sin = float64_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
            ref = functools.partial(ref_attention, attn, x, pos, pos, cfg)
            cases.append(Case(f"Attention ({mask_kind}, {attn_impl})", exercises.call_attention,
                              dict(cfg=over, state=attn.state_dict(), x=x, cos=cos, sin=sin, mask=naive_bool_mask(cfg, pos)),
                              {"out": ref()}, {"out": 1e-6 if attn_impl == "math" else TOL64}, mistakes={
                "GQA heads repeated in the wrong order (query head h on key/value head h % n_kv_heads)":
                    {"out": lambda ref=ref: ref(gqa="strided")},
                "the softmax taken over the queries (dim -2), not over the keys (dim -1)":
                    {"out": lambda ref=ref: ref(softmax_over="queries")},
                "the scores divided by sqrt(d_model), not by sqrt(head_dim)":
                    {"out": lambda ref=ref, cfg=cfg: ref(scale=cfg.d_model)}}))
    check(*cases)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prune", [False, True])
def test_explicit_and_sdpa_kernels_agree(device, prune):
    math_model = make_model(device, attn_impl="math")
    sdpa_model = make_model(device, attn_impl="sdpa")
    embeds = torch.randn(2, 256, math_model.cfg.d_model, device=device)
    with torch.no_grad():
        torch.testing.assert_close(sdpa_model.llm(embeds, prune=prune), math_model.llm(embeds, prune=prune),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_bool_and_additive_masks_agree(attn_impl):
    cfg = CogVLAConfig.tiny(attn_impl=attn_impl)
    torch.manual_seed(6)
    attn = cm.Attention(cfg)
    x = torch.randn(2, 256, cfg.d_model)
    cos, sin = cm.RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(torch.arange(256)[None], x.dtype)
    allowed = cm.attention_mask(cfg, torch.arange(256)[None])
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin, additive), attn(x, cos, sin, allowed))


def test_causal_kernel_without_a_mask_matches_dense_and_is_refused_with_lfp():
    causal, plain = make_model(attn_impl="sdpa_causal"), make_model(attn_impl="math")
    embeds = torch.randn(1, 256, plain.cfg.d_model)
    with torch.no_grad():
        torch.testing.assert_close(causal.llm(embeds, prune=False), plain.llm(embeds, prune=False),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="sdpa_causal.*takes no mask.*flash-attn"):
        causal(*causal.example_inputs()[:3])


# ----------------------------------------------------------------------------- SwiGLU MLP

def ref_silu(x):
    return x / (1 + torch.exp(-x))


def ref_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_mlp(mlp, x):
    return ref_linear(mlp.down_proj, ref_silu(ref_linear(mlp.gate_proj, x)) * ref_linear(mlp.up_proj, x))


@pytest.mark.exercise("swiglu")
def test_swiglu_mlp_is_down_of_silu_gate_times_up(check):
    cfg = small_cfg()
    torch.manual_seed(0)
    mlp = cm.MLP(cfg).double()
    x = randn(2, 5, cfg.d_model, seed=7)
    gate, up = ref_linear(mlp.gate_proj, x), ref_linear(mlp.up_proj, x)

    def down(h):
        return ref_linear(mlp.down_proj, h)
    check(Case("SwiGLU MLP", exercises.call_mlp, dict(cfg=small(), state=mlp.state_dict(), x=x), {"out": ref_mlp(mlp, x)},
               {"out": TOL64}, mistakes={
        "SiLU on the up branch instead of the gate": {"out": down(gate * ref_silu(up))},
        "gate and up added, not multiplied": {"out": down(ref_silu(gate) + up)},
        "GELU where SiLU is meant": {"out": down(ref_gelu(gate) * up)}}))


# ----------------------------------------------------------------------------- the block and the dense decoder

def ref_block(layer, x, rope_positions, token_positions, cfg, mlp_weight=None, weight_on="mlp"):
    """Pre-norm Llama block; mlp_weight [B, N] scales the MLP output only (classic mistakes:
    weight_on="attention", scaling the attention output instead; weight_on=None, no scaling)."""
    eps = cfg.rms_eps
    a = ref_attention(layer.self_attn, ref_rmsnorm(x, layer.input_layernorm.weight, eps),
                      rope_positions, token_positions, cfg)
    if mlp_weight is not None and weight_on == "attention":
        a = a * mlp_weight[..., None]
    x = x + a
    m = ref_mlp(layer.mlp, ref_rmsnorm(x, layer.post_attention_layernorm.weight, eps))
    if mlp_weight is not None and weight_on == "mlp":
        m = m * mlp_weight[..., None]
    return x + m


@pytest.mark.parametrize("mask_kind", ["causal", "catten"])
def test_dense_decoder_matches_naive_prenorm_llama(mask_kind):
    cfg = small_cfg(mask_kind=mask_kind)
    llm = make_llm(cfg)
    x = randn(2, cfg.seq_len, cfg.d_model, seed=8)
    with torch.no_grad():
        got = llm(x, prune=False)
    assert_close(got, ref_decoder(llm, x, cfg, prune=False), TOL32, f"dense decoder ({mask_kind})")


@pytest.mark.parametrize("device", DEVICES)
def test_dense_decoder_is_causal(device):
    model = make_model(device, n_layers=4, schedule={2: 0.5})
    torch.manual_seed(1)
    embeds = torch.randn(1, 256, model.cfg.d_model, device=device)
    with torch.no_grad():
        base = model.llm(embeds, prune=False)
        for j in (1, 100, 230):
            changed = embeds.clone()
            changed[:, j] += 1.0
            out = model.llm(changed, prune=False)
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, j], base[:, j])


def llama_keys(n_layers):
    keys = {"embed_tokens.weight", "norm.weight"}
    for i in range(n_layers):
        keys |= {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        keys |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        keys |= {f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"}
    return keys


def test_decoder_state_dict_has_llama_keys_plus_the_lfp_scorers(tiny):
    keys = set(tiny.llm.state_dict())
    assert {k for k in keys if ".router." not in k} == llama_keys(32)
    assert {int(k.split(".")[1]) for k in keys if ".router." in k} == set(SOURCE_LAYERS)


def test_decoder_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    cfg = CogVLAConfig.tiny(n_layers=3, schedule={1: 0.5})
    torch.manual_seed(7)
    ours = cm.LlamaDecoder(cfg).eval()
    for p in ours.parameters():   # RMSNorm weights start at 1: make every tensor matter
        torch.nn.init.normal_(p, mean=float(p.dim() == 1), std=0.1)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta, max_position_embeddings=512,
        attention_bias=False, mlp_bias=False, attn_implementation="eager")
    hf = transformers.LlamaModel(hf_cfg).eval()
    llama_state = {k: v for k, v in ours.state_dict().items() if ".router." not in k}
    assert set(hf.state_dict()) == set(llama_state)
    hf.load_state_dict(llama_state)
    embeds = torch.randn(2, 40, cfg.d_model)
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds).last_hidden_state
        torch.testing.assert_close(ours(embeds, prune=False), expected, rtol=0, atol=1e-5)


# =============================================================================== LFP, each phase beside its naive reference


# ----------------------------------------------------------------------------- Phase 1: the router

def ref_router_keep_prob(router, h, cfg, film="1 + gamma", filmed=None, text_from="text"):
    """h: input-normed hidden [B, N, D] -> keep probability [B, N]; FiLM on the vision slice only.
    Classic mistakes: film="gamma" (x * gamma + beta), filmed=range(N) (every token FiLMed),
    text_from="all" (FiLM from the mean of every token, not of the text)."""
    B, N, D = h.shape
    feats = h.clone()
    if cfg.router_film:
        text = (h[:, cfg.text_start:cfg.action_start].sum(1) / cfg.n_text if text_from == "text"
                else h.sum(1) / N)                                              # [B, D]
        fs, fb = router.film_scale, router.film_shift
        gamma = ref_linear(fs[2], ref_gelu(ref_linear(fs[0], text)))
        beta = ref_linear(fb[2], ref_gelu(ref_linear(fb[0], text)))
        scale = 1 + gamma if film == "1 + gamma" else gamma
        for t in filmed or range(cfg.vision_start, cfg.text_start):
            feats[:, t] = h[:, t] * scale + beta
    logits = ref_linear(router.score, feats)                                   # [B, N, 2] (drop, keep)
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return e[..., 1] / e.sum(-1)


@pytest.mark.exercise("router")
def test_router_keep_probability_uses_film_on_vision_only(check):
    cfg = small_cfg()
    llm = make_llm(cfg)
    router = llm.layers[1].router
    h = randn(2, cfg.seq_len, cfg.d_model, seed=14)
    ref = functools.partial(ref_router_keep_prob, router, h, cfg)
    check(Case("router keep probability", exercises.call_router, dict(cfg=small(), state=router.state_dict(), h=h),
               {"keep_prob": ref()}, {"keep_prob": TOL64}, mistakes={
        "FiLM as x * gamma + beta (not the identity when gamma = beta = 0: use 1 + gamma)":
           {"keep_prob": ref(film="gamma")},
        "FiLM applied to every token, not only the vision slice": {"keep_prob": ref(filmed=range(cfg.seq_len))},
        "the drop probability (column 0) returned, not keep (column 1)": {"keep_prob": 1 - ref()},
        "FiLM read from the mean of every token, not of the text tokens": {"keep_prob": ref(text_from="all")}}))


def test_keep_scores_come_from_the_filmed_vision_tokens_and_the_rest_as_they_are():
    model = make_model()
    randomize_films(model, vision=False)
    cfg, router = model.cfg, model.llm.layers[10].router
    h = torch.randn(2, 256, cfg.d_model)
    text = h[:, cfg.text_start:cfg.action_start].mean(1)
    vision = h[:, 1:cfg.text_start] * (1 + router.film_scale(text)[:, None]) + router.film_shift(text)[:, None]
    clear = torch.cat([h[:, :1], vision, h[:, cfg.text_start:]], dim=1)      # the source's Phase 1.2
    torch.testing.assert_close(router(h), router.score(clear).softmax(-1)[..., 1])
    assert not torch.allclose(router(h), router.score(h).softmax(-1)[..., 1])  # FiLM did something


def test_films_are_identity_at_init(tiny):
    h = torch.randn(2, 256, tiny.cfg.d_model)
    router = tiny.llm.layers[5].router
    torch.testing.assert_close(router(h), router.score(h).softmax(-1)[..., 1], rtol=0, atol=0)
    block = tiny.vision.dino.blocks[0]
    x, cond = torch.randn(2, 80, tiny.cfg.dino_width), torch.randn(2, tiny.cfg.d_model)
    q, k, v = cm.rearrange(block.qkv(block.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=block.heads)
    y = x + block.proj(cm.rearrange(torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                    "b h n d -> b n (h d)"))
    torch.testing.assert_close(block(x, cond), y + block.mlp(block.norm2(y)))


def test_untrained_keep_probabilities_scale_every_tokens_mlp_alike(tiny):
    """At init no token's MLP is silenced: keep probabilities (the MLP weights of Phase 4) sit
    near 0.88 for every token, action queries included, with a small spread that ranks them."""
    images, text_ids, state, _ = tiny.example_inputs(batch_size=2)
    with torch.no_grad():
        records = tiny(images, text_ids, state).lfp
    for r in records:
        p = r.keep_probs
        assert 0.8 < p.min() and p.max() < 0.95, f"layer {r.layer}: keep probabilities {p.min():.2f}..{p.max():.2f}"
        assert (p[:, 1:193].std(dim=1) > 1e-3).all()                        # a spread, so top-k is not by position


def kept_for_two_instructions(model):
    images, text_ids, state, _ = model.example_inputs(batch_size=2)
    other = (text_ids + 7) % model.cfg.vocab_size
    with torch.no_grad():
        a, b = model(images, text_ids, state), model(images, other, state)
    return [torch.equal(x.kept_indices, y.kept_indices) for x, y in zip(a.lfp, b.lfp)]


def test_instruction_cannot_change_kept_tokens_until_a_film_is_trained():
    # Causal mask: vision tokens precede the text, so only the FiLMs carry the task to them.
    # (8 layers, 3 of them LFP: the claim is per LFP layer.)
    small = dict(n_layers=8, schedule={2: 0.8, 4: 0.5, 6: 0.3})
    assert all(kept_for_two_instructions(make_model(**small)))
    router_only = make_model(**small)
    randomize_films(router_only, router=True, vision=False)
    assert not all(kept_for_two_instructions(router_only))
    vision_only = make_model(**small)
    randomize_films(vision_only, router=False, vision=True)
    assert not all(kept_for_two_instructions(vision_only))


@pytest.mark.parametrize("router_film", [True, False])
def test_keep_scores_and_films_get_gradients_from_the_action_loss(router_film):
    # Not the last layer: there the vision outputs are read by nothing, so no gradient reaches them.
    model = make_model(n_layers=4, schedule={1: 0.7, 2: 0.3}, router_film=router_film).train()
    model(*model.example_inputs(batch_size=2)).loss.backward()
    for layer in (model.llm.layers[1], model.llm.layers[2]):
        assert layer.router.score.weight.grad.abs().sum() > 0
        if router_film:
            for mlp in (layer.router.film_scale, layer.router.film_shift):
                assert mlp[-1].weight.grad.abs().sum() > 0
        else:
            assert not hasattr(layer.router, "film_scale")
    for vit in (model.vision.dino, model.vision.siglip):
        for block in vit.blocks:
            assert block.film_scale.weight.grad.abs().sum() > 0
            assert block.film_shift.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- Phase 2: select

def ref_n_kept(cfg, ratio):
    return cfg.seq_len - cfg.n_vision + math.floor(cfg.n_vision * ratio)


def ref_select(keep_prob_row, k, cfg):
    """BOS and everything from text_start on, plus the best vision tokens; sorted by position."""
    N = keep_prob_row.shape[0]
    forced = [0] + list(range(cfg.text_start, N))
    vision = sorted(range(cfg.vision_start, cfg.text_start), key=lambda t: -float(keep_prob_row[t].detach()))
    n = k - len(forced)
    if 0 < n < len(vision):   # the test's own setup must leave no near-tie at the cut
        gap = float((keep_prob_row[vision[n - 1]] - keep_prob_row[vision[n]]).detach())
        assert gap > 1e-5, f"test setup: keep probabilities tie at the top-k cut (gap {gap:.2g}); change the seed"
    return sorted(forced + vision[:n])


def test_n_kept_tokens_is_all_tokens_minus_the_dropped_vision_floor():
    cfg = small_cfg()
    for ratio in (0.3, 0.5, 0.74, 1.0):
        want = ref_n_kept(cfg, ratio)
        assert cm.n_kept_tokens(cfg, ratio) == want, \
            f"ratio {ratio}: expected {want} tokens kept, got {cm.n_kept_tokens(cfg, ratio)}"


@pytest.mark.exercise("select")
def test_select_forces_bos_and_all_non_vision_and_drops_the_worst_vision_at_both_ends(check):
    cfg = small_cfg()
    N = cfg.seq_len
    k = ref_n_kept(cfg, 0.5)
    rows = []
    for seed, worst in ((10, [cfg.vision_start]), (11, [cfg.text_start - 1]),
                        (12, [cfg.vision_start, cfg.text_start - 1])):
        p = torch.rand(N, generator=gen(seed), dtype=torch.float64) * 0.8 + 0.1
        p[0] = p[cfg.text_start:] = 0.0                                   # forced tokens score lowest
        for t in worst:
            p[t] = 0.01 + 0.001 * t                                       # the first / last vision tokens worst
        rows.append(p)
    keep_prob = torch.stack(rows)
    want = torch.tensor([ref_select(keep_prob[b], k, cfg) for b in range(3)])
    force = torch.zeros(N, dtype=torch.float64)
    force[0] = force[cfg.text_start:] = math.inf
    by_score = (keep_prob + force).topk(k).indices
    check(Case(f"select(keep_prob [3, {N}] float64, k={k}): BOS is 0, the vision tokens {cfg.vision_start}.."
               f"{cfg.text_start - 1}, text and action from {cfg.text_start}", exercises.call_select,
               dict(cfg=small(), keep_prob=keep_prob, k=k), {"idx": want, "keep_prob": keep_prob},
               {"idx": 0, "keep_prob": 0}, mistakes={
        "top-k indices left in score order: the kept tokens must stay in sequence order (sort them)":
           {"idx": by_score},
        "BOS, text and action not forced in: they score lowest here": {"idx": keep_prob.topk(k).indices.sort().values},
        "argsort of the top-k indices (their ranks), where sort (their values) is meant": {"idx": by_score.argsort()},
        "keep_prob changed in place (force with a new tensor: the layer still needs it)":
           {"keep_prob": keep_prob + force}}))


def test_only_vision_tokens_are_dropped_and_kept_indices_are_sorted_and_unique(tiny):
    cfg = tiny.cfg
    images, text_ids, state, _ = tiny.example_inputs(batch_size=3)
    with torch.no_grad():
        out = tiny(images, text_ids, state)
    for record in out.lfp:
        for kept in record.kept_indices.tolist():
            assert kept == sorted(set(kept))
            dropped = set(range(cfg.seq_len)) - set(kept)
            assert all(cfg.vision_start <= i < cfg.text_start for i in dropped)
    # samples differ, so the router really chose per sample
    assert not torch.equal(out.lfp[0].kept_indices[0], out.lfp[0].kept_indices[1])


# ----------------------------------------------------------------------------- Phases 3 and 5: gather and scatter

def kept_rows(seed, B=2, N=9, K=5):
    """[B, K] sorted, distinct positions in [0, N), different per row."""
    g = gen(seed)
    return torch.stack([torch.randperm(N, generator=g)[:K].sort().values for _ in range(B)])


@pytest.mark.exercise("gather_scatter")
def test_gather_and_scatter_tokens_take_and_replace_the_kept_rows(check):
    x, y = randn(2, 9, 10, seed=40), randn(2, 5, 10, seed=41)
    idx = kept_rows(42)
    rows = torch.stack([x[b, idx[b]] for b in range(2)])                      # [B, K, D], row by row
    want = x.clone()
    for b in range(2):
        for n, t in enumerate(idx[b].tolist()):
            want[b, t] = y[b, n]                                              # replaced: y holds the residual
    kept = want != x
    check(Case("gather_tokens(x, idx)", exercises.call_gather_tokens, dict(x=x, idx=idx), {"out": rows}, {"out": 0}, mistakes={
              "the rows taken from the first sample for every sample": {"out": x[0][idx]},
              "the columns (features) gathered, not the rows": {"out": torch.stack([x[b][:, idx[b]] for b in range(2)])}}),
          Case("scatter_tokens(x, idx, y)", exercises.call_scatter_tokens, dict(x=x, idx=idx, y=y), {"out": want, "x": x},
               {"out": 0, "x": 0}, mistakes={
              "added instead of replaced (scatter_add, +=): the residual counted twice (x + y at the kept rows)":
                  {"out": want + kept * x},
              "the kept rows' values thrown away (only y, zeros elsewhere)": {"out": kept * want},
              "x itself changed (an in-place scatter_ or assignment into x): return a new tensor": {"x": want}}))


# ----------------------------------------------------------------------------- the LFP layer (Phases 1-6)

def ref_lfp_layer(layer, x, cfg, ratio, weight_on="mlp", add=False):
    """The whole LFP layer by hand: (output [B, N, D], kept indices per row, keep_prob [B, N]).
    Classic mistakes: weight_on="attention" or None (see ref_block) and add=True (scatter_add:
    the residual counted twice)."""
    B, N, D = x.shape
    p = ref_router_keep_prob(layer.router, ref_rmsnorm(x, layer.input_layernorm.weight, cfg.rms_eps), cfg)
    k = ref_n_kept(cfg, ratio)
    out = x.clone()
    kept_all = []
    for b in range(B):
        kept = ref_select(p[b], k, cfg)
        kept_all.append(kept)
        xk = x[b:b + 1, kept]                                                  # [1, K, D]
        tok = torch.tensor(kept)[None]
        rope_pos = torch.arange(k)[None] if cfg.position_mode == "reindex" else tok
        y = ref_block(layer, xk, rope_pos, tok, cfg, mlp_weight=p[b:b + 1, kept], weight_on=weight_on)
        for n, t in enumerate(kept):
            out[b, t] = y[0, n] + (x[b, t] if add else 0)                     # replaced, not added
    return out, kept_all, p


def lfp_layer_inputs(model, batch=2, seed=4):
    cfg = model.cfg
    torch.manual_seed(seed)
    x = torch.randn(batch, cfg.seq_len, cfg.d_model)
    pos = torch.arange(cfg.seq_len)[None]
    return x, pos, cm.attention_mask(cfg, torch.arange(cfg.seq_len)[None])


@pytest.mark.exercise("lfp_layer")
def test_lfp_layer_matches_naive_scoring_choice_block_and_scatter(check):
    cases = []
    for position_mode in ("reindex", "original"):
        for mask_kind in ("causal", "catten"):
            over = small(position_mode=position_mode, mask_kind=mask_kind, d_model=32)
            cfg = cm.CogVLAConfig.tiny(**over)
            llm = make_llm(cfg)
            layer, ratio = llm.layers[1], cfg.lfp_ratios[1]
            x = randn(2, cfg.seq_len, cfg.d_model, seed=13)
            want, kept, keep_prob = ref_lfp_layer(layer, x, cfg, ratio)
            n_dropped = x.shape[0] * (cfg.seq_len - ref_n_kept(cfg, ratio))
            ref = functools.partial(ref_lfp_layer, layer, x, cfg, ratio)
            other = dataclasses.replace(cfg, position_mode="original" if position_mode == "reindex" else "reindex")
            # float32 norm, RoPE angles and softmax inside the float64 block: ~1e-6 observed (TOL32).
            cases.append(Case(f"forward_lfp ({position_mode}, {mask_kind})", exercises.call_lfp_layer,
                              dict(cfg=over, state=llm.state_dict(), x=x, layer=1),
                              {"keep_probs": keep_prob, "kept_indices": torch.tensor(kept),
                               "dropped rows changed by": torch.zeros(n_dropped, cfg.d_model, dtype=torch.float64),
                               "out": want},
                              {"keep_probs": 1e-6, "kept_indices": 0, "dropped rows changed by": 0, "out": TOL32},
                              mistakes={
                "the router weight scales the attention output, not the MLP's":
                    {"out": lambda ref=ref: ref(weight_on="attention")[0]},
                "the router weight left out (the MLP output unscaled: no gradient reaches the router)":
                    {"out": lambda ref=ref: ref(weight_on=None)[0]},
                "added instead of replaced (scatter_add, +=): the kept tokens' residual counted twice":
                    {"out": lambda ref=ref: ref(add=True)[0]},
                f"the kept tokens' RoPE positions as in position_mode={other.position_mode!r}":
                    {"out": lambda layer=layer, x=x, other=other, ratio=ratio: ref_lfp_layer(layer, x, other, ratio)[0]}}))
    check(*cases)


@pytest.mark.exercise("lfp_layer")
def test_lfp_layer_with_ratio_1_and_unit_keep_weights_is_a_standard_layer(check):
    over = small(schedule={1: 1.0}, d_model=32)      # the weights of the test above: stored once
    cfg = cm.CogVLAConfig.tiny(**over)
    llm = make_llm(cfg)
    x = randn(2, cfg.seq_len, cfg.d_model, seed=4)
    positions = torch.arange(cfg.seq_len)[None].expand(2, -1)
    check(Case("forward_lfp keeping every token with keep probability 1 vs the plain block", exercises.call_lfp_layer_unit_weights,
               dict(cfg=over, state=llm.state_dict(), x=x, layer=1),
               {"out": ref_block(llm.layers[1], x, positions, positions, cfg)}, {"out": TOL32}))


def test_scatter_leaves_dropped_tokens_bit_exact(tiny):
    layer = tiny.llm.layers[20]
    x, pos, mask = lfp_layer_inputs(tiny)
    records = []
    with torch.no_grad():
        out = layer.forward_lfp(x, pos, tiny.llm.rotary_emb, records)
    kept = torch.zeros(x.shape[:2], dtype=torch.bool).scatter(1, records[0].kept_indices, True)
    assert (~kept).sum() == 2 * (192 - 76)
    assert torch.equal(out[~kept], x[~kept])
    assert not torch.isclose(out[kept], x[kept]).all(dim=-1).any()


def test_reindexed_and_original_positions_agree_before_the_first_drop_and_differ_after():
    outs, logs = {}, {}
    for mode in ("reindex", "original"):
        model = make_model(n_layers=1, schedule={0: 0.5}, position_mode=mode)
        x, pos, mask = lfp_layer_inputs(model, batch=1)
        logs[mode] = []
        with torch.no_grad():
            outs[mode] = model.llm.layers[0].forward_lfp(x, pos, model.llm.rotary_emb, logs[mode])
    kept = logs["reindex"][0].kept_indices[0]
    assert torch.equal(kept, logs["original"][0].kept_indices[0])
    first_drop = int((kept != torch.arange(len(kept))).nonzero()[0])   # kept[i] == i before it
    a, b = outs["reindex"][0], outs["original"][0]
    torch.testing.assert_close(a[:first_drop], b[:first_drop], rtol=0, atol=1e-6)
    text = slice(x.shape[1] - 63, None)                                # after every drop
    assert not torch.isclose(a[text], b[text], rtol=0, atol=1e-5).all(dim=-1).any()
    dropped = torch.ones(x.shape[1], dtype=torch.bool)
    dropped[kept] = False
    assert torch.equal(a[dropped], b[dropped])                         # untouched either way


@pytest.mark.exercise("lfp_layer")
def test_non_finite_hidden_state_after_scatter_names_the_layer(check):
    check(Case("a decoder whose LFP layer 2 computes inf", exercises.call_lfp_layer_with_inf,
               dict(cfg=dict(n_layers=4, schedule={2: 0.5}), layer=2, x=randn(1, 256, 64, seed=15).float()),
               raises="FloatingPointError: LFP layer 2"))


# ----------------------------------------------------------------------------- the schedule

def test_source_ratios_keep_163_143_115_76_51_38_vision_tokens():
    assert [int(192 * r) for r in cm.SOURCE_SCHEDULE.values()] == [163, 143, 115, 76, 51, 38]


def schedule_as_tensor(table, n_layers=32):
    return torch.tensor([float(table.get(l, 0.0)) for l in range(n_layers)], dtype=torch.float64)


@pytest.mark.exercise("schedule")
def test_source_formula_gives_the_values_spec_states(check):
    want = [math.cos(l * math.pi / 31) / 2 + 0.5 for l in SOURCE_LAYERS]      # 0.937 0.765 0.525 0.280 0.090 0.003
    check(Case(f"shifted_cos_with_ratio(0.5, layer, 32) for layers {SOURCE_LAYERS}", exercises.call_shifted_cos,
               dict(average=0.5, layers=SOURCE_LAYERS, n_layers=32), {"ratios": torch.tensor(want, dtype=torch.float64)},
               {"ratios": 1e-12}, mistakes={
        "cos(layer pi / n_layers): n_layers - 1 is the last layer":
           {"ratios": torch.tensor([math.cos(l * math.pi / 32) / 2 + 0.5 for l in SOURCE_LAYERS], dtype=torch.float64)},
        "the cosine not halved":
           {"ratios": torch.tensor([math.cos(l * math.pi / 31) + 0.5 for l in SOURCE_LAYERS], dtype=torch.float64)}}))


@pytest.mark.exercise("schedule")
def test_reference_schedule_prunes_layers_8_to_31_floored_at_0_15(check):
    curve = {l: math.cos(l * math.pi / 31) / 2 + 0.5 for l in range(32)}
    want = {l: max(r, 0.15) for l, r in curve.items() if r <= 0.85}
    assert list(want) == list(range(8, 32)) and curve[7] > 0.85     # the claim, of the formula itself
    check(Case("shifted_schedule(shifted_cos_with_ratio, 0.5, top=0.85, floor=0.15, 32): each layer's ratio, "
               "0 where it does not prune", exercises.call_shifted_schedule,
               dict(curve="shiftedcos", average=0.5, top=0.85, floor=0.15, n_layers=32),
               {"ratios": schedule_as_tensor(want)}, {"ratios": 1e-12}, mistakes={
        "no floor: the ratio must be max(curve, min)": {"ratios": schedule_as_tensor({l: r for l, r in curve.items() if r <= 0.85})},
        "every layer prunes: only those with curve <= max do": {"ratios": schedule_as_tensor({l: max(r, 0.15) for l, r in curve.items()})},
        "the max/min roles swapped": {"ratios": schedule_as_tensor({l: max(r, 0.85) for l, r in curve.items() if r <= 0.15})}}))


@pytest.mark.exercise("schedule")
def test_linear_schedule_follows_its_formula(check):
    want = {l: max(1 - l / 31, 0.15) for l in range(5, 32)}   # 1 - l/31 <= 0.85 from layer 5 on; floored from 27
    check(Case("shifted_schedule(shifted_linear_with_ratio, 0.5, top=0.85, floor=0.15, 32)", exercises.call_shifted_schedule,
               dict(curve="shiftedlinear", average=0.5, top=0.85, floor=0.15, n_layers=32),
               {"ratios": schedule_as_tensor(want)}, {"ratios": 1e-12}))


@pytest.mark.exercise("schedule")
def test_average_ratio_shifts_the_schedule(check):
    cases = []
    for average in (0.4, 0.6):
        curve = {l: math.cos(l * math.pi / 31) / 2 + average for l in range(32)}
        want = {l: max(r, 0.15) for l, r in curve.items() if r <= 0.85}
        cases.append(Case(f"shifted_schedule(shifted_cos_with_ratio, average={average}, top=0.85, floor=0.15, 32)",
                          exercises.call_shifted_schedule, dict(curve="shiftedcos", average=average, top=0.85, floor=0.15, n_layers=32),
                          {"ratios": schedule_as_tensor(want)}, {"ratios": 1e-12}, mistakes={
            "the average left out (0.5 whatever is asked)": {"ratios": schedule_as_tensor(
                {l: max(r - average + 0.5, 0.15) for l, r in curve.items() if r - average + 0.5 <= 0.85})}}))
    first_lfp_layer = [int(c.want["ratios"].nonzero()[0]) for c in cases]
    assert first_lfp_layer[0] < first_lfp_layer[1]      # a lower average prunes from an earlier layer on
    check(*cases)


def test_config_edited_after_it_is_made_is_used_and_a_built_model_refuses_it():
    cfg = CogVLAConfig.tiny()
    built = cm.LlamaDecoder(cfg)
    cfg.schedule = cm.REFERENCE_SCHEDULE
    assert sorted(cfg.lfp_ratios) == list(range(8, 32))
    rebuilt = cm.LlamaDecoder(cfg)
    assert sorted(rebuilt.layers[i].layer for i in range(8, 32)) == list(range(8, 32))
    with pytest.raises(ValueError, match="changed after this model was built"):
        built(torch.randn(1, cfg.seq_len, cfg.d_model))


def test_dict_of_ratios_prunes_exactly_the_given_layers():
    model = make_model(n_layers=3, schedule={0: 1.0, 2: 0.25})
    images, text_ids, state, _ = model.example_inputs(batch_size=2)
    with torch.no_grad():
        out = model(images, text_ids, state)
    assert [(r.layer, r.kept_indices.shape[1]) for r in out.lfp] == [(0, 256), (2, 256 - 144)]


# ----------------------------------------------------------------------------- the decoder with LFP layers

def ref_decoder(llm, x, cfg, prune):
    positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    for i, layer in enumerate(llm.layers):
        if prune and i in cfg.lfp_ratios:
            x = ref_lfp_layer(layer, x, cfg, cfg.lfp_ratios[i])[0]
        else:
            x = ref_block(layer, x, positions, positions, cfg)
    return ref_rmsnorm(x, llm.norm.weight, cfg.rms_eps)


def test_pruned_decoder_matches_naive_llama_with_a_naive_pruning_layer():
    cfg = small_cfg(mask_kind="catten", position_mode="original")
    llm = make_llm(cfg)
    x = randn(2, cfg.seq_len, cfg.d_model, seed=9)
    records = []
    with torch.no_grad():
        got = llm(x, prune=True, records=records)
    assert [r.layer for r in records] == [1], f"expected one LFP record for layer 1, got {[r.layer for r in records]}"
    assert_close(got, ref_decoder(llm, x, cfg, prune=True), TOL32, "pruned decoder")


@pytest.mark.parametrize("device", DEVICES)
def test_source_layers_keep_the_sources_token_counts(device):
    model = make_model(device)
    images, text_ids, state, _ = model.example_inputs(batch_size=3)
    with torch.no_grad():
        out = model(images, text_ids, state)
    assert [r.layer for r in out.lfp] == SOURCE_LAYERS
    assert [tuple(r.kept_indices.shape) for r in out.lfp] == [(3, k) for k in SOURCE_COUNTS]
    assert all(r.keep_probs.shape == (3, 256) for r in out.lfp)


def test_reference_ratios_prune_where_they_say_in_a_forward():
    model = make_model(schedule="shiftedcos_decay_0.85_0.15")
    images, text_ids, state, _ = model.example_inputs(batch_size=2)
    with torch.no_grad():
        out = model(images, text_ids, state)
    assert [r.layer for r in out.lfp] == list(range(8, 32))
    assert out.lfp[-1].kept_indices.shape[1] == 256 - 192 + int(192 * 0.15)


@pytest.mark.parametrize("mask_kind", ["causal", "catten"])
def test_with_lfp_action_tokens_never_reach_vision_or_text(mask_kind):
    model = make_model(mask_kind=mask_kind)
    cfg = model.cfg
    torch.manual_seed(2)
    embeds = torch.randn(2, 256, cfg.d_model)
    changed = embeds.clone()
    changed[:, cfg.action_start:] += torch.randn(2, 256 - cfg.action_start, cfg.d_model)
    records_a, records_b = [], []
    with torch.no_grad():
        a = model.llm(embeds, records=records_a)
        b = model.llm(changed, records=records_b)
    torch.testing.assert_close(b[:, :cfg.action_start], a[:, :cfg.action_start], rtol=0, atol=1e-6)
    assert all(torch.equal(x.kept_indices, y.kept_indices) for x, y in zip(records_a, records_b))
    assert not torch.allclose(b[:, cfg.action_start:], a[:, cfg.action_start:])


def test_lfp_on_a_sequence_of_the_wrong_length_is_refused(tiny):
    with pytest.raises(ValueError, match="expected 256 tokens, got 100"):
        tiny.llm(torch.randn(1, 100, tiny.cfg.d_model))


def test_forward_without_value_checks_never_reads_a_value_back(monkeypatch):
    """Each read of a tensor's value on the host (bool, int, item) waits for a GPU; the LFP
    path must have none when cfg.check_values is off, or a GPU benchmark is tilted against it."""
    model = make_model(check_values=False)
    inputs = model.example_inputs()[:3]

    def refuse(*_):
        raise AssertionError("a tensor value was read back on the host")

    with torch.no_grad():
        for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        model(*inputs)                                                      # no read-back: no error
        checked = make_model(check_values=True)
        with pytest.raises(AssertionError, match="read back"):             # the probe does catch them
            checked(*inputs)


# =============================================================================== the vision tower

def ref_layernorm(ln, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()


def ref_vit_block(block, x, cond, film="1 + gamma", film_at="between"):
    """x [n, W] one image's tokens, cond [D]: x + attn; x * (1 + gamma) + beta; x + mlp(norm2(x)).
    Classic mistakes: film="gamma" (x * gamma + beta), film_at="after_mlp" or "before_attention"."""
    n, W = x.shape
    heads = block.heads
    d = W // heads
    gamma, beta = ref_linear(block.film_scale, cond), ref_linear(block.film_shift, cond)

    def film_(x):
        return x * ((1 + gamma) if film == "1 + gamma" else gamma) + beta
    if film_at == "before_attention":
        x = film_(x)
    qkv = ref_linear(block.qkv, ref_layernorm(block.norm1, x))                   # [n, 3W]: q | k | v
    q, k, v = qkv[:, :W], qkv[:, W:2 * W], qkv[:, 2 * W:]
    att = torch.zeros(n, W, dtype=torch.float64)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        for i in range(n):
            s = (k[:, sl] @ q[i, sl]) / math.sqrt(d)                             # bidirectional
            p = torch.exp(s - s.max())
            att[i, sl] = (p / p.sum()) @ v[:, sl]
    x = x + ref_linear(block.proj, att)
    if film_at == "between":
        x = film_(x)
    m = block.mlp
    x = x + ref_linear(m[2], ref_gelu(ref_linear(m[0], ref_layernorm(block.norm2, x))))
    return film_(x) if film_at == "after_mlp" else x


def ref_patches(image, p):
    """image [3, S, S] -> [P, p*p*3], patches row-major, each flattened (row, col, channel)."""
    side = image.shape[-1] // p
    return torch.stack([image[:, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1)
                        for r in range(side) for c in range(side)])


def ref_vit(vit, image, cond, cfg):
    x = ref_linear(vit.patch_embed, ref_patches(image, cfg.patch_size)) + vit.pos_embed.double()
    if vit.agg_tokens is not None:
        x = torch.cat([x, vit.agg_tokens.double()])                              # appended at the end
    for block in vit.blocks:
        x = ref_vit_block(block, x, cond)
    return x[-cfg.n_agg_tokens:] if vit.agg_tokens is not None else x            # the last G tokens


def ref_projector(proj, x):
    return ref_linear(proj[-1], ref_gelu(ref_linear(proj[0], x)))


def ref_fusion_weights(fusion, instruction):
    logits = ref_linear(fusion[-1], ref_gelu(ref_linear(fusion[0], instruction)))  # [2]
    e = torch.exp(logits - logits.max())
    return e / e.sum()


def ref_vision_tower(tower, images, instruction, cfg, weights=None):
    """Each image through both encoders and projectors, mixed by the fusion weights [B, 2] (by
    default the softmax of the fusion MLP's output; a classic mistake's otherwise)."""
    if weights is None:
        weights = torch.stack([ref_fusion_weights(tower.fusion, instruction[b]) for b in range(images.shape[0])])
    out = []
    for b in range(images.shape[0]):
        per_image = []
        for i in range(images.shape[1]):
            dino = ref_projector(tower.dino_proj, ref_vit(tower.dino, images[b, i], instruction[b], cfg))
            sig = ref_projector(tower.siglip_proj, ref_vit(tower.siglip, images[b, i], instruction[b], cfg))
            per_image.append(weights[b, 0] * dino + weights[b, 1] * sig)
        out.append(torch.cat(per_image))
    return torch.stack(out)


def make_tower(cfg, seed=0):
    torch.manual_seed(seed)
    tower = cm.VisionTower(cfg).double()
    return randomize_(tower, seed + 200, std=0.2)    # FiLMs, fusion, agg tokens all non-zero


@pytest.mark.exercise("vit_film")
def test_vit_block_is_self_attn_then_film_one_plus_gamma_then_mlp(check):
    cfg = small_cfg()
    block = randomize_(cm.ViTBlock(32, 2, 4.0, cfg.d_model).double(), 15, std=0.2)
    x = randn(2, 10, 32, seed=16)
    cond = randn(2, cfg.d_model, seed=17)

    def ref(**kw):
        return torch.stack([ref_vit_block(block, x[b], cond[b], **kw) for b in range(2)])
    check(Case("ViTBlock(32, heads=2)", exercises.call_vit_block,
               dict(width=32, heads=2, mlp_ratio=4.0, d_cond=cfg.d_model, state=block.state_dict(), x=x, cond=cond),
               {"out": ref()}, {"out": TOL64}, mistakes={
        "FiLM as x * gamma + beta (not the identity when gamma = beta = 0: use 1 + gamma)": {"out": ref(film="gamma")},
        "FiLM after the MLP, not between attention and MLP": {"out": ref(film_at="after_mlp")},
        "FiLM before the attention, not between attention and MLP": {"out": ref(film_at="before_attention")}}))


def test_vit_output_is_the_last_n_agg_tokens_of_the_sequence():
    cfg = small_cfg()
    tower = make_tower(cfg)
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=gen(18), dtype=torch.float64)
    cond = randn(2, cfg.d_model, seed=19)
    got = tower.dino(images, cond)
    for b in range(2):
        assert_close(got[b], ref_vit(tower.dino, images[b], cond[b], cfg), TOL64, f"ViT hand-run, image {b}")


def test_vit_without_blocks_returns_exactly_the_aggregation_tokens():
    cfg = small_cfg(dino_depth=0)
    tower = make_tower(cfg)
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=gen(20), dtype=torch.float64)
    got = tower.dino(images, randn(2, cfg.d_model, seed=21))
    want = tower.dino.agg_tokens.detach().expand(2, -1, -1)
    assert torch.equal(got, want), "no blocks: expected the output to be the aggregation tokens, it is not"


def test_projector_is_linear_gelu_linear():
    proj = randomize_(cm.projector(32, 16).double(), 22)
    x = randn(3, 5, 32, seed=23)
    assert_close(proj(x), ref_projector(proj, x), TOL64, "projector")


@pytest.mark.exercise("fusion")
def test_vision_tower_matches_a_hand_run_with_softmax_fusion_weights(check):
    over = small(dino_depth=1, siglip_depth=1)      # one block each: what the fusion needs
    cfg = cm.CogVLAConfig.tiny(**over)
    tower = make_tower(cfg)
    images = torch.rand(2, cfg.n_images, 3, cfg.image_size, cfg.image_size, generator=gen(24)).double()
    instruction = randn(2, cfg.d_model, seed=25, scale=2.0)
    logits = torch.stack([ref_linear(tower.fusion[-1], ref_gelu(ref_linear(tower.fusion[0], t))) for t in instruction])
    ref = functools.partial(ref_vision_tower, tower, images, instruction, cfg)
    check(Case("VisionTower", exercises.call_vision_tower, dict(cfg=over, state=tower.state_dict(), images=images,
                                                   instruction=instruction), {"out": ref()}, {"out": TOL64}, mistakes={
        "the two encoders' weights swapped (weights[:, 0] belongs to dino)": {"out": lambda: ref(logits.softmax(-1).flip(-1))},
        "the fusion logits used as weights, without the softmax": {"out": lambda: ref(logits)},
        "the softmax over the batch, not over the two encoders": {"out": lambda: ref(logits.softmax(0))}}))


@pytest.mark.exercise("fusion")
def test_fusion_weight_one_picks_that_encoder_alone(check):
    over = small(dino_depth=1, siglip_depth=1)      # one block each: what the fusion needs
    cfg = cm.CogVLAConfig.tiny(**over)
    cases = []
    for winner in (0, 1):
        tower = make_tower(cfg)
        with torch.no_grad():
            tower.fusion[-1].weight.zero_()
            tower.fusion[-1].bias.copy_(torch.tensor([100.0, -100.0] if winner == 0 else [-100.0, 100.0]))
        images = torch.rand(2, cfg.n_images, 3, cfg.image_size, cfg.image_size, generator=gen(26)).double()
        instruction = randn(2, cfg.d_model, seed=27)
        vit, proj = (tower.dino, tower.dino_proj) if winner == 0 else (tower.siglip, tower.siglip_proj)
        want = torch.stack([torch.cat([ref_projector(proj, ref_vit(vit, images[b, i], instruction[b], cfg))
                                       for i in range(cfg.n_images)]) for b in range(2)])
        name = "dino" if winner == 0 else "siglip"
        cases.append(Case(f"fusion weights ({winner == 0:d}, {winner == 1:d}): the {name} branch alone", exercises.call_vision_tower,
                          dict(cfg=over, state=tower.state_dict(), images=images, instruction=instruction),
                          {"out": want}, {"out": TOL64}))
    check(*cases)


# =============================================================================== classic mistakes, planted
# Each mistake an exercise's failure message names, planted into the reference's own code (a
# minimal edit of its source), must fail that exercise's tests with a message that names it.

PLANTED = [   # (exercise, function, [(reference text, the mistake's text)], what the message names)
    ("rmsnorm", "RMSNorm.forward", [("x32.pow(2).mean(-1, keepdim=True)", "x32.pow(2).sum(-1, keepdim=True)")],
     "a sum of squares where their mean is meant"),
    ("rmsnorm", "RMSNorm.forward", [("x32 = x.float()", "x32 = x")], "normalised in bf16, not float32"),
    ("rope", "RotaryEmbedding.forward", [("dtype=torch.float32)", "dtype=dtype)"),
                                         ("position_ids.float()", "position_ids.to(dtype)")],
     "the frequencies and angles computed in bf16"),
    ("causal_mask", "attention_mask", [('if cfg.mask_kind == "catten":', "if False:")],
     "the action segment left causal"),
    ("attention", "Attention.forward", [("scores.softmax(dim=-1", "scores.softmax(dim=-2")],
     "the softmax taken over the queries"),
    ("attention", "Attention.forward", [("math.sqrt(cfg.head_dim)", "math.sqrt(cfg.d_model)")],
     "the scores divided by sqrt(d_model), not by sqrt(head_dim)"),
    ("swiglu", "MLP.forward", [("F.silu(", "F.gelu(")], "GELU where SiLU is meant"),
    ("router", "Router.forward", [("h[:, cfg.text_start:cfg.action_start].mean(dim=1)", "h.mean(dim=1)")],
     "FiLM read from the mean of every token"),
    ("select", "select", [("idx.sort(dim=-1).values", "idx.argsort(dim=-1)")], "argsort of the top-k indices"),
    ("gather_scatter", "scatter_tokens", [("out = x.clone()", "out = x")], "x itself changed"),
    ("lfp_layer", "LFPDecoderLayer.forward_lfp", [("y + w_kept[..., None] * self.mlp(", "y + self.mlp(")],
     "the router weight left out"),
    ("vit_film", "ViTBlock.forward", [("x = x * (1 + gamma[:, None]) + beta[:, None]", "pass"),
                                      ("return x + self.mlp(self.norm2(x))",
                                       "x = x + self.mlp(self.norm2(x))\n    return x * (1 + gamma[:, None]) + beta[:, None]")],
     "FiLM after the MLP"),
    ("vit_film", "ViTBlock.forward", [("x = x * (1 + gamma[:, None]) + beta[:, None]", "pass"),
                                      ("q, k, v = rearrange(", "x = x * (1 + self.film_scale(cond)[:, None]) + "
                                       "self.film_shift(cond)[:, None]\n    q, k, v = rearrange(")],
     "FiLM before the attention"),
    ("fusion", "VisionTower.forward", [("self.fusion(instruction).softmax(-1)", "self.fusion(instruction)")],
     "the fusion logits used as weights, without the softmax"),
    ("fusion", "VisionTower.forward", [("self.fusion(instruction).softmax(-1)", "self.fusion(instruction).softmax(0)")],
     "the softmax over the batch"),
]


def planted(where, edits):
    """The reference's function `where` ("Class.method" or "function") with `edits` made to its
    source: (owner, name, the mistaken function)."""
    *owner_path, name = where.split(".")
    owner = getattr(cm, owner_path[0]) if owner_path else cm
    source = textwrap.dedent(inspect.getsource(getattr(owner, name)))
    for right, wrong in edits:
        assert source.count(right) == 1, f"{where}: expected {right!r} once in its source"
        source = source.replace(right, wrong)
    namespace = dict(vars(cm))
    exec(compile(source, f"<{where} with a planted mistake>", "exec"), namespace)
    return owner, name, namespace[name]


@pytest.mark.parametrize("exercise_id, where, edits, named", PLANTED, ids=[f"mistake-{i}" for i in range(len(PLANTED))])
def test_a_planted_classic_mistake_fails_its_exercise_naming_it(monkeypatch, exercise_id, where, edits, named):
    owner, name, mistaken = planted(where, edits)
    monkeypatch.setattr(owner, name, mistaken)
    messages = []
    for ex, test in exercises.exercise_tests(sys.modules[__name__]):
        for case in exercises.cases_of(ex, test) if ex == exercise_id else []:
            try:
                exercises.check(case, cm)
            except AssertionError as err:
                messages.append(str(err))
    assert messages, f"{where} with the mistake '{named}' planted passed every test of exercise {exercise_id}"
    assert any(f"likely mistake: {named}" in m for m in messages), \
        f"no failure of exercise {exercise_id} names '{named}'; they say:\n" + "\n".join(messages)


# =============================================================================== CogVLA

def make_naive_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = cm.CogVLA(cfg).double().eval()
    randomize_(model.vision, seed + 300, std=0.2)
    with torch.no_grad():
        model.action_queries.copy_(randn(*model.action_queries.shape, seed=seed + 301))
        model.state_embed.copy_(randn(*model.state_embed.shape, seed=seed + 302))
    return model


def naive_inputs(cfg, B=2, seed=30):
    g = gen(seed)
    images = torch.rand(B, cfg.n_images, 3, cfg.image_size, cfg.image_size, generator=g, dtype=torch.float64)
    text_ids = torch.randint(0, cfg.vocab_size, (B, cfg.n_text), generator=g)
    state = torch.rand(B, cfg.n_state, generator=g, dtype=torch.float64) * 2 - 1
    actions = torch.rand(B, cfg.chunk_len, cfg.action_dim, generator=g, dtype=torch.float64) * 2 - 1
    return images, text_ids, state, actions


def test_embed_lays_out_bos_vision_text_state_queries():
    cfg = small_cfg()
    model = make_naive_model(cfg)
    images, text_ids, state, _ = naive_inputs(cfg)
    with torch.no_grad():
        seq = model.embed(images, text_ids, state)
        E = model.llm.embed_tokens.weight.double()
        text = E[text_ids]                                                         # [B, T, D]
        vision = ref_vision_tower(model.vision, images, text.sum(1) / cfg.n_text, cfg)
    B = text_ids.shape[0]
    assert seq.shape == (B, cfg.seq_len, cfg.d_model), f"expected [B, N, D] = {(B, cfg.seq_len, cfg.d_model)}, got {tuple(seq.shape)}"
    assert_close(seq[:, 0], E[cfg.bos_id].expand(B, -1), 0.0, "position 0: the BOS embedding")
    assert_close(seq[:, 1:1 + cfg.n_vision], vision, TOL64, "positions 1..V: vision (instruction = mean text embedding)")
    t0 = 1 + cfg.n_vision
    assert_close(seq[:, t0:t0 + cfg.n_text], text, 0.0, "the text embeddings after the vision tokens")
    s0 = t0 + cfg.n_text
    W, bias = model.state_proj.weight.double()[:, 0], model.state_proj.bias.double()
    for j in range(cfg.n_state):
        want = state[:, j, None] * W + bias + model.state_embed[j]
        assert_close(seq[:, s0 + j], want, TOL64, f"state token {j}: state_proj(value) + state_embed[{j}]")
    assert_close(seq[:, s0 + cfg.n_state:], model.action_queries.expand(B, -1, -1), 0.0, "the action queries last")


def test_state_value_survives_the_first_norm_at_init():
    """The first layer reads each token through RMSNorm, which keeps a vector's direction and
    drops its size. state_proj(s) = s * w alone (its bias starts at zero) would reach it as
    +-w / rms(w), whatever s is; the state embedding added beside it must make the normed token
    turn with s. (Cosine here: 0.70-0.77 at std 0.3, 0.98 at std 0.02, where the toy trainer's
    loss stalled for 100-150 steps.)"""
    torch.manual_seed(0)
    model = cm.CogVLA(cm.CogVLAConfig.tiny(n_layers=2, schedule={1: 0.5}))
    cfg = model.cfg
    images, text_ids, _, _ = model.example_inputs(batch_size=2)
    state = torch.tensor([[0.1] * cfg.n_state, [0.7] * cfg.n_state])          # the same sign, 7x the size

    @torch.no_grad()
    def cosine():   # of the two samples' normed state tokens, as layer 0 reads them -> [n_state]
        seq = model.embed(images, text_ids, state)                             # [2, N, D]
        tokens = model.llm.layers[0].input_layernorm(seq[:, cfg.action_start:cfg.action_start + cfg.n_state])
        return torch.cosine_similarity(tokens[0], tokens[1], dim=-1)

    cos = cosine()
    assert (cos < 0.95).all(), (
        f"the normed state tokens for s = 0.1 and s = 0.7 point nearly the same way (cosine {cos.tolist()}): the first "
        f"layer can hardly tell the two values apart. RMSNorm drops the size of s * w; the state embedding, "
        f"added beside it, must be of comparable size (CogVLA.reset_parameters)")
    with torch.no_grad():
        model.state_embed.zero_()
    cos = cosine()   # the reason, shown: without the embedding the value's size is gone
    assert (cos > 0.9999).all(), (
        f"with state_embed = 0 the normed state tokens should coincide (cosine {cos.tolist()}): something else "
        f"is added to s * w (a state_proj bias that does not start at zero?), so the reason above no longer holds")


def test_queries_of_the_same_action_value_start_alike(tiny):
    q = tiny.action_queries.detach().view(tiny.cfg.chunk_len, tiny.cfg.action_dim, -1)   # [C, A, D] as the head reads them
    same = (q - q[:1]).norm(dim=-1).max()                  # one value, any two chunk steps
    different = (q[:, :1] - q[:, 1:]).norm(dim=-1).min()   # two values
    assert same < 0.1 * different


@pytest.mark.parametrize("prune", [False, True])
def test_query_i_lands_at_step_i_div_action_dim_value_i_mod_action_dim(prune):
    cfg = small_cfg()
    model = make_naive_model(cfg)
    images, text_ids, state, actions = naive_inputs(cfg)
    seen = {}
    handle = model.llm.register_forward_hook(lambda m, args, out: seen.__setitem__("hidden", out))
    try:
        with torch.no_grad():
            out = model(images, text_ids, state, actions, prune=prune)
    finally:
        handle.remove()
    hidden = seen["hidden"]
    head = model.action_head
    A, Q, N = cfg.action_dim, cfg.n_queries, cfg.seq_len
    assert out.actions.shape == (2, cfg.chunk_len, A), f"expected actions [2, {cfg.chunk_len}, {A}], got {tuple(out.actions.shape)}"
    for i in range(Q):
        h = hidden[:, N - Q + i]                                                  # query i's final hidden state
        want = ref_linear(head[-1], ref_gelu(ref_linear(head[0], h)))[:, 0]
        assert_close(out.actions[:, i // A, i % A], want, TOL64, f"query {i} -> pred[:, {i // A}, {i % A}]")
    l1 = (out.actions.double() - actions).abs().mean()
    assert abs(out.loss.item() - l1.item()) < 1e-6, f"expected the L1 loss (mean |pred - actions|) {l1.item():.8f}, got {out.loss.item():.8f}"


def test_model_forward_matches_naive_decoder_on_the_embedded_sequence():
    cfg = small_cfg(mask_kind="catten")
    model = make_naive_model(cfg)
    for i, layer in enumerate(model.llm.layers):   # non-trivial router FiLM
        if isinstance(layer, cm.LFPDecoderLayer):
            randomize_router_(layer.router, 400 + i)
    images, text_ids, state, _ = naive_inputs(cfg)
    with torch.no_grad():
        seq = model.embed(images, text_ids, state)
        out = model(images, text_ids, state)
        hidden = ref_decoder(model.llm, seq, cfg, prune=True)
    head = model.action_head
    want = ref_linear(head[-1], ref_gelu(ref_linear(head[0], hidden[:, -cfg.n_queries:])))[..., 0]
    assert_close(out.actions.reshape(2, -1), want, TOL32, "model actions vs naive decoder + head")


def test_a_tiny_model_overfits_one_batch():
    model = make_model(n_layers=2, schedule={0: 0.5}, n_agg_tokens=8).train()
    batch = model.example_inputs(batch_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(200):
        loss = model(*batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < first / 10:
            break
    assert loss.item() < first / 10, f"loss {first:.3f} -> {loss.item():.3f} in {step + 1} steps"


# =============================================================================== accounting and tracing

def split_flops(counts):
    """FlopCounterMode's per-module counts -> (projection matmuls, attention QK^T and AV matmuls)."""
    leaf = lambda name: name.split(".")[-1]
    total = lambda d: sum(d.values())
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    linear = sum(total(d) for name, d in counts.items() if leaf(name) in projections)
    attn_module = [total(d) for name, d in counts.items() if leaf(name) in ("self_attn", "Attention")]
    assert len(attn_module) == 1, f"expected one attention module in the FLOP counts, got {list(counts)}"
    qkvo = sum(total(d) for name, d in counts.items() if leaf(name) in projections[:4])
    return linear, attn_module[0] - qkvo


@pytest.mark.parametrize("B", [1, 2])
def test_accounting_attn_and_linear_flops_equal_counted_flops_dense_and_lfp(B):
    cfg = small_cfg()
    torch.manual_seed(0)
    llm = cm.LlamaDecoder(cfg)
    x = torch.randn(B, cfg.seq_len, cfg.d_model, generator=gen(31))
    pos = torch.arange(cfg.seq_len)[None]
    cos, sin = llm.rotary_emb(pos, x.dtype)
    acc = cm.account(cfg, batch_size=B)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            llm.layers[0](x, cos, sin, torch.tril(torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool))[None, None])
        dense = split_flops(fc.get_flop_counts())
        with FlopCounterMode(display=False) as fc:
            llm.layers[1].forward_lfp(x, pos, llm.rotary_emb)
        lfp = split_flops(fc.get_flop_counts())
        # The router's own entry (named by its class when forward_lfp is called directly) holds its submodules'.
        router = sum(sum(d.values()) for name, d in fc.get_flop_counts().items() if name.split(".")[-1] in ("router", "Router"))
    K = ref_n_kept(cfg, cfg.lfp_ratios[1])
    for c, (linear, attn), tokens, what in ((acc.layers[0], dense, cfg.seq_len, "dense layer 0"),
                                            (acc.layers[1], lfp, K, "LFP layer 1 block")):
        assert c.tokens == tokens, f"{what}: expected {tokens} tokens, got {c.tokens}"
        assert c.linear_flops == linear, f"{what}: counted {linear} projection FLOPs, account says {c.linear_flops}"
        assert c.attn_flops == attn, f"{what}: counted {attn} QK^T+AV FLOPs, account says {c.attn_flops}"
    assert acc.layers[1].router_flops == router, f"LFP layer 1: counted {router} router FLOPs, account says {acc.layers[1].router_flops}"
    assert acc.dense[1].attn_flops == dense[1] and acc.dense[1].linear_flops == dense[0], \
        "the dense column of layer 1: expected the dense layer's counted FLOPs"


def test_accounting_reproduces_the_sources_figures_and_the_true_totals():
    acc = cm.account(CogVLAConfig.full())
    per_layer = {c.layer: c for c in acc.layers}
    assert round(per_layer[0].attn_n2d / 1e6) == 268 and round(per_layer[5].attn_n2d / 1e6) == 211
    assert [per_layer[l].tokens for l in SOURCE_LAYERS] == SOURCE_COUNTS
    assert per_layer[6].tokens == 256                                     # scatter: all tokens again
    assert round(acc.token_share, 3) == 0.931
    assert round(acc.total("attn_n2d", dense=True) / acc.total("attn_n2d"), 2) == 1.12
    assert 1.06 < acc.speedup_bound < 1.08
    assert acc.total("kv_bytes", dense=True) == 128 * 2 ** 20
    persist = cm.account(CogVLAConfig.full(), pruning_persists=True)
    assert round(persist.total("attn_n2d") / 1e9, 2) == 4.69               # not the source's 5.12
    ref = cm.account(CogVLAConfig.full(schedule="shiftedcos_decay_0.85_0.15"))
    assert round(ref.token_share, 3) == 0.651
    assert round(ref.speedup_bound, 2) == 1.54


def test_accounting_counts_the_keep_scorer():
    cfg = CogVLAConfig.tiny(n_layers=2, schedule={1: 1.0})
    acc = cm.account(cfg)
    assert acc.layers[1].router_flops > 0 and acc.layers[0].router_flops == 0
    assert acc.speedup_bound < 1.0        # a ratio-1.0 LFP layer only adds work


def test_walkthrough_prints_the_tokens_each_layer_processed(capsys):
    cm.walkthrough()
    out = capsys.readouterr().out
    for layer, count in zip(SOURCE_LAYERS, SOURCE_COUNTS):
        assert f"{layer:>5} {count:>13}" in out
    assert "93.1% of dense" in out and "65.1% of dense" in out


def test_the_pruned_decoder_traces_as_one_graph_for_torch_compile():
    """bench.py --compile needs the whole decoder as one graph (fullgraph=True): no Python in its
    forward that TorchDynamo cannot trace, on the reference schedule's path too. Dynamo alone
    (backend "eager", no code generation) on 4 layers, 3 of them pruning, in a few seconds."""
    cfg = cm.CogVLAConfig.tiny(schedule=cm.REFERENCE_SCHEDULE, n_layers=4, check_values=False)
    llm = cm.LlamaDecoder(cfg).eval()
    assert len(cfg.lfp_ratios) == 3
    x = torch.randn(1, cfg.seq_len, cfg.d_model)
    traced = torch.compile(lambda x: llm(x, prune=True), backend="eager", fullgraph=True)
    with torch.no_grad():
        assert_close(traced(x), llm(x, prune=True), 1e-6, what="the traced LFP decoder")

