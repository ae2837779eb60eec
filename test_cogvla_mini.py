"""Executable claims about cogvla_mini.py and train_toy.py. Seconds on a CPU; the
device-parametrised ones run on CUDA too when there is one."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import cogvla_mini as cm
import train_toy
from cogvla_mini import CogVLA, CogVLAConfig

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA device"))]
SEED_LAYERS = [5, 10, 15, 20, 25, 30]
SEED_COUNTS = [227, 207, 179, 140, 115, 102]   # the source's token counts


def make_model(device="cpu", seed=0, **overrides):
    torch.manual_seed(seed)
    return CogVLA(CogVLAConfig.tiny(**overrides)).to(device).eval()


def randomize_films(model, router=True, vision=True, std=0.5):
    """Give the (zero-initialised) FiLM output layers real weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.llm.layers:
            if router and isinstance(layer, cm.LFPDecoderLayer):
                for mlp in (layer.router.film_scale, layer.router.film_shift):
                    mlp[-1].weight.copy_(torch.randn(mlp[-1].weight.shape, generator=g) * std)
        if vision:
            for vit in (model.vision.dino, model.vision.siglip):
                for block in vit.blocks:
                    for film in (block.film_scale, block.film_shift):
                        film.weight.copy_(torch.randn(film.weight.shape, generator=g) * std)


@pytest.fixture(scope="module")
def tiny():
    return make_model()


# ----------------------------------------------------------------------------- shapes

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


# ----------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("device", DEVICES)
def test_seed_schedule_keeps_the_sources_token_counts(device):
    model = make_model(device)
    images, text_ids, state, _ = model.example_inputs(batch_size=3)
    with torch.no_grad():
        out = model(images, text_ids, state)
    assert [r.layer for r in out.lfp] == SEED_LAYERS
    assert [tuple(r.kept_indices.shape) for r in out.lfp] == [(3, k) for k in SEED_COUNTS]
    assert all(r.keep_probs.shape == (3, 256) for r in out.lfp)


def test_seed_ratios_keep_163_143_115_76_51_38_vision_tokens():
    assert [int(192 * r) for r in cm.SEED_SCHEDULE.values()] == [163, 143, 115, 76, 51, 38]


def test_seed_formula_gives_the_values_spec_states():
    got = [cm.shifted_cos_with_ratio(0.5, l, 32) for l in SEED_LAYERS]
    assert got == pytest.approx([0.937, 0.765, 0.525, 0.280, 0.090, 0.003], abs=1e-3)
    assert cm.shifted_linear_with_ratio(0.5, 0, 32) == 1.0
    assert cm.shifted_linear_with_ratio(0.5, 31, 32) == 0.0


def test_reference_schedule_prunes_layers_8_to_31_floored_at_0_15():
    cfg = CogVLAConfig.tiny(schedule="shiftedcos_decay_0.85_0.15")
    assert list(cfg.lfp_ratios) == list(range(8, 32))
    for layer, ratio in cfg.lfp_ratios.items():
        assert ratio == pytest.approx(max(math.cos(layer * math.pi / 31) / 2 + 0.5, 0.15))
    assert min(cfg.lfp_ratios.values()) == 0.15
    assert math.cos(7 * math.pi / 31) / 2 + 0.5 > 0.85   # why layer 7 does not prune


def test_reference_schedule_forward_prunes_where_it_says():
    model = make_model(schedule="shiftedcos_decay_0.85_0.15")
    images, text_ids, state, _ = model.example_inputs(batch_size=2)
    with torch.no_grad():
        out = model(images, text_ids, state)
    assert [r.layer for r in out.lfp] == list(range(8, 32))
    assert out.lfp[-1].kept_indices.shape[1] == 256 - 192 + int(192 * 0.15)


def test_linear_schedule_follows_its_formula():
    cfg = CogVLAConfig.tiny(schedule="shiftedlinear_decay_0.85_0.15")
    # 1 - l/31 <= 0.85 from layer 5 on; below 0.15 from layer 27 on
    assert list(cfg.lfp_ratios) == list(range(5, 32))
    assert cfg.lfp_ratios[5] == pytest.approx(1 - 5 / 31)
    assert [cfg.lfp_ratios[l] for l in range(27, 32)] == [0.15] * 5


def test_average_ratio_shifts_the_schedule():
    lo = CogVLAConfig.tiny(schedule="shiftedcos_decay_0.85_0.15", lfp_average=0.4).lfp_ratios
    hi = CogVLAConfig.tiny(schedule="shiftedcos_decay_0.85_0.15", lfp_average=0.6).lfp_ratios
    assert min(lo) < min(hi)   # a lower average starts pruning earlier


def test_dict_schedule_prunes_exactly_the_given_layers():
    model = make_model(n_layers=3, schedule={0: 1.0, 2: 0.25})
    images, text_ids, state, _ = model.example_inputs(batch_size=2)
    with torch.no_grad():
        out = model(images, text_ids, state)
    assert [(r.layer, r.kept_indices.shape[1]) for r in out.lfp] == [(0, 256), (2, 256 - 144)]


# ----------------------------------------------------------------------------- causality and masks

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


@pytest.mark.parametrize("mask_kind", ["causal", "catten"])
def test_with_lfp_action_tokens_never_reach_vision_or_text(mask_kind):
    model = make_model(mask_kind=mask_kind)
    cfg = model.cfg
    torch.manual_seed(2)
    embeds = torch.randn(2, 256, cfg.d_model)
    changed = embeds.clone()
    changed[:, cfg.action_start:] += torch.randn(2, 256 - cfg.action_start, cfg.d_model)
    log_a, log_b = [], []
    with torch.no_grad():
        a = model.llm(embeds, lfp_log=log_a)
        b = model.llm(changed, lfp_log=log_b)
    torch.testing.assert_close(b[:, :cfg.action_start], a[:, :cfg.action_start], rtol=0, atol=1e-6)
    assert all(torch.equal(x.kept_indices, y.kept_indices) for x, y in zip(log_a, log_b))
    assert not torch.allclose(b[:, cfg.action_start:], a[:, cfg.action_start:])


@pytest.mark.parametrize("mask_kind", ["causal", "catten"])
def test_gathered_mask_is_the_kept_rows_and_columns_of_the_full_mask(mask_kind):
    cfg = CogVLAConfig.tiny(mask_kind=mask_kind)
    full = cm.attention_mask(cfg, torch.arange(cfg.seq_len)[None])
    assert full.shape == (1, 1, 256, 256)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(256, generator=g)[:150].sort().values for _ in range(2)])
    gathered = cm.gather_mask(full, idx)          # the seed's Phase 3: rows, then columns
    built = cm.attention_mask(cfg, idx)           # what the LFP layer does: build it from the indices
    assert gathered.shape == built.shape == (2, 1, 150, 150)
    for b in range(2):
        kept = idx[b].tolist()
        expect = torch.tensor([[bool(full[0, 0, i, j]) for j in kept] for i in kept])
        assert torch.equal(gathered[b, 0], expect)
        assert torch.equal(built[b, 0], expect)


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


# ----------------------------------------------------------------------------- selection, gather, scatter

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


def lfp_layer_inputs(model, batch=2, seed=4):
    cfg = model.cfg
    torch.manual_seed(seed)
    x = torch.randn(batch, cfg.seq_len, cfg.d_model)
    pos = torch.arange(cfg.seq_len)[None]
    return x, pos, cm.attention_mask(cfg, torch.arange(cfg.seq_len)[None])


def test_scatter_leaves_dropped_tokens_bit_exact(tiny):
    layer = tiny.llm.layers[20]
    x, pos, mask = lfp_layer_inputs(tiny)
    log = []
    with torch.no_grad():
        out = layer.forward_lfp(x, pos, tiny.llm.rotary_emb, log)
    kept = torch.zeros(x.shape[:2], dtype=torch.bool).scatter(1, log[0].kept_indices, True)
    assert (~kept).sum() == 2 * (192 - 76)
    assert torch.equal(out[~kept], x[~kept])
    assert not torch.isclose(out[kept], x[kept]).all(dim=-1).any()


def test_lfp_layer_with_ratio_1_and_unit_router_weights_is_a_standard_layer(monkeypatch):
    model = make_model(n_layers=2, schedule={1: 1.0})
    layer = model.llm.layers[1]
    x, pos, mask = lfp_layer_inputs(model)
    monkeypatch.setattr(layer.router, "forward", lambda h: torch.ones(h.shape[:2]))
    cos, sin = model.llm.rotary_emb(pos, x.dtype)
    with torch.no_grad():
        torch.testing.assert_close(layer.forward_lfp(x, pos, model.llm.rotary_emb),
                                   layer(x, cos, sin, mask), rtol=0, atol=1e-6)


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


def test_non_finite_hidden_state_after_scatter_names_the_layer():
    model = make_model(n_layers=4, schedule={2: 0.5})
    with torch.no_grad():
        model.llm.layers[2].self_attn.o_proj.weight.fill_(float("inf"))
    images, text_ids, state, _ = model.example_inputs()
    with pytest.raises(FloatingPointError, match="LFP layer 2"):
        model(images, text_ids, state)


# ----------------------------------------------------------------------------- gradients and FiLM

@pytest.mark.parametrize("router_film", [True, False])
def test_router_and_films_get_gradients_from_the_action_loss(router_film):
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


def test_router_splices_filmed_vision_scores_like_the_clear_concatenation():
    model = make_model()
    randomize_films(model, vision=False)
    cfg, router = model.cfg, model.llm.layers[10].router
    h = torch.randn(2, 256, cfg.d_model)
    text = h[:, cfg.text_start:cfg.action_start].mean(1)
    vision = h[:, 1:cfg.text_start] * (1 + router.film_scale(text)[:, None]) + router.film_shift(text)[:, None]
    clear = torch.cat([h[:, :1], vision, h[:, cfg.text_start:]], dim=1)      # the seed's Phase 1.2
    torch.testing.assert_close(router(h), router.score(clear).softmax(-1)[..., 1])
    assert not torch.allclose(router(h), router.score(h).softmax(-1)[..., 1])  # FiLM did something


def test_benchmark_runs_at_toy_size_and_ends_with_json_lines():
    lines = []
    rows = cm.benchmark(width=64, batch=1, reps=1, warmup=0, out=lines.append)
    parsed = [json.loads(line) for line in lines]
    assert parsed == rows
    assert [(r["schedule"], r["pass"]) for r in rows] == [
        (s, p) for s in ("seed", cm.REFERENCE_SCHEDULE) for p in ("forward", "forward+backward")]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["lfp_ms"], rel=0.01)
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["bound"], rel=0.01)
        cfg = cm.bench_config(r["schedule"], 64, full=False)
        assert r["bound"] == pytest.approx(cm.account(cfg, 1).speedup_bound, abs=1e-3)
    backward = [r for r in rows if r["pass"] == "forward+backward"]
    assert all(r["dense_saved_mib"] > 0 and r["lfp_saved_mib"] > 0 for r in backward)
    timings = cm.profile_lfp_layer(width=64, batch=1, reps=1, out=lines.append)
    assert timings["LFP layer, whole"] > 0 and "  2 select (top-k, sort)" in timings


def kept_for_two_instructions(model):
    images, text_ids, state, _ = model.example_inputs(batch_size=2)
    other = (text_ids + 7) % model.cfg.vocab_size
    with torch.no_grad():
        a, b = model(images, text_ids, state), model(images, other, state)
    return [torch.equal(x.kept_indices, y.kept_indices) for x, y in zip(a.lfp, b.lfp)]


def test_instruction_cannot_change_kept_tokens_until_a_film_is_trained():
    # Causal mask: vision tokens precede the text, so only the FiLMs carry the task to them.
    assert all(kept_for_two_instructions(make_model()))
    router_only = make_model()
    randomize_films(router_only, router=True, vision=False)
    assert not all(kept_for_two_instructions(router_only))
    vision_only = make_model()
    randomize_films(vision_only, router=False, vision=True)
    assert not all(kept_for_two_instructions(vision_only))


# ----------------------------------------------------------------------------- RoPE and attention

def test_rope_score_depends_only_on_the_position_offset():
    rope = cm.RotaryEmbedding(16, 10000.0)
    torch.manual_seed(5)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cq, sq = rope(torch.tensor([[m]]), torch.float32)
        ck, sk = rope(torch.tensor([[n]]), torch.float32)
        return (cm.apply_rope(q, cq, sq) * cm.apply_rope(k, ck, sk)).sum().item()

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) == pytest.approx(score(4, 0), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prune", [False, True])
def test_explicit_and_sdpa_attention_agree(device, prune):
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


def test_flash_kernel_matches_dense_and_is_refused_with_lfp():
    flash, plain = make_model(attn_impl="flash"), make_model(attn_impl="math")
    embeds = torch.randn(1, 256, plain.cfg.d_model)
    with torch.no_grad():
        torch.testing.assert_close(flash.llm(embeds, prune=False), plain.llm(embeds, prune=False),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="flash.*mask"):
        flash(*flash.example_inputs()[:3])


def llama_keys(n_layers):
    keys = {"embed_tokens.weight", "norm.weight"}
    for i in range(n_layers):
        keys |= {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        keys |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        keys |= {f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"}
    return keys


def test_decoder_state_dict_has_llama_keys_plus_routers(tiny):
    keys = set(tiny.llm.state_dict())
    assert {k for k in keys if ".router." not in k} == llama_keys(32)
    assert {int(k.split(".")[1]) for k in keys if ".router." in k} == set(SEED_LAYERS)


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


# ----------------------------------------------------------------------------- bad input

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
])
def test_bad_input_gets_a_value_error_saying_what_was_expected(tiny, what, message):
    with pytest.raises(ValueError, match=message):
        tiny(*bad(tiny, what))


@pytest.mark.parametrize("overrides, message", [
    (dict(schedule="cosine"), "unknown schedule 'cosine'"),
    (dict(schedule="shiftedcos_decay_0.15_0.85"), "0 < min <= max <= 1"),
    (dict(schedule={5: 0.0}), r"ratio for layer 5 must be in \(0, 1\], got 0.0"),
    (dict(schedule={5: 1.5}), r"ratio for layer 5 must be in \(0, 1\], got 1.5"),
    (dict(schedule={32: 0.5}), r"LFP layer index must be an int in \[0, 32\), got 32"),
    (dict(schedule={-1: 0.5}), r"got -1"),
    (dict(n_layers=8), '"seed" is defined for 32 layers, got n_layers=8; use "shiftedcos_decay'),
    (dict(attn_impl="flash_attention_2"), "attn_impl 'math', 'sdpa' or 'flash'"),
    (dict(mask_kind="bidirectional"), "mask_kind 'causal' or 'catten'"),
    (dict(position_mode="absolute"), "position_mode 'reindex' or 'original'"),
    (dict(d_model=66), "d_model divisible by n_heads"),
    (dict(image_size=30), "image_size divisible by patch_size"),
])
def test_bad_config_gets_a_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        CogVLAConfig.tiny(**overrides)


def test_lfp_on_a_sequence_of_the_wrong_length_is_refused(tiny):
    with pytest.raises(ValueError, match="expected 256 tokens, got 100"):
        tiny.llm(torch.randn(1, 100, tiny.cfg.d_model))


# ----------------------------------------------------------------------------- accounting

def test_accounting_reproduces_the_seeds_figures_and_the_true_totals():
    acc = cm.account(CogVLAConfig.seed())
    per_layer = {c.layer: c for c in acc.layers}
    assert round(per_layer[0].attn_n2d / 1e6) == 268 and round(per_layer[5].attn_n2d / 1e6) == 211
    assert [per_layer[l].tokens for l in SEED_LAYERS] == SEED_COUNTS
    assert per_layer[6].tokens == 256                                     # scatter: all tokens again
    assert round(acc.token_share, 3) == 0.931
    assert round(acc.total("attn_n2d", dense=True) / acc.total("attn_n2d"), 2) == 1.12
    assert 1.06 < acc.speedup_bound < 1.08
    assert acc.total("kv_bytes", dense=True) == 128 * 2 ** 20
    persist = cm.account(CogVLAConfig.seed(), pruning_persists=True)
    assert round(persist.total("attn_n2d") / 1e9, 2) == 4.69               # not the seed's 5.12
    ref = cm.account(CogVLAConfig.seed(schedule="shiftedcos_decay_0.85_0.15"))
    assert round(ref.token_share, 3) == 0.651
    assert round(ref.speedup_bound, 2) == 1.54


def test_accounting_counts_the_router():
    cfg = CogVLAConfig.tiny(n_layers=2, schedule={1: 1.0})
    acc = cm.account(cfg)
    assert acc.layers[1].router_flops > 0 and acc.layers[0].router_flops == 0
    assert acc.speedup_bound < 1.0        # a ratio-1.0 LFP layer only adds work


def test_walkthrough_prints_the_tokens_each_layer_processed(capsys):
    cm.walkthrough()
    out = capsys.readouterr().out
    for layer, count in zip(SEED_LAYERS, SEED_COUNTS):
        assert f"{layer:>5} {count:>13}" in out
    assert "93.1% of dense" in out and "65.1% of dense" in out


# ----------------------------------------------------------------------------- it learns

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


# ----------------------------------------------------------------------------- the toy trainer

TOY_ARGS = ["--batch-size", "4", "--eval-size", "4", "--log-every", "1", "--lr", "3e-3"]


def test_toy_targets_end_at_the_named_block_drawn_in_its_colour():
    batch = train_toy.make_batch(16, seed=3)
    final = batch["state"] + batch["actions"][..., :3].sum(dim=1) * train_toy.STEP_SCALE
    torch.testing.assert_close(final, batch["goal"])
    assert batch["actions"].abs().max() <= 1.0
    colours = list(train_toy.COLORS)
    pixel = (torch.arange(56) + 0.5) / 56 * 2 - 1
    for b in range(16):
        words = [train_toy.VOCAB[i] for i in batch["text_ids"][b].tolist()]
        assert words == words[:4] * 5                               # the instruction, tiled to 20 tokens
        assert words[0] in ("pick", "push") and words[1:4] == ["the", words[2], "block"]
        assert batch["actions"][b, :, 3].eq(1.0 if words[0] == "pick" else -1.0).all()
        rgb = torch.tensor(train_toy.COLORS[words[2]])
        for cam, (u, v) in enumerate(train_toy.VIEWS):   # every pixel of that colour is the named block
            img = batch["images"][b, cam]
            rows, cols = (img - rgb[:, None, None]).abs().sum(0).lt(1e-6).nonzero(as_tuple=True)
            if len(rows):
                assert (pixel[cols] - batch["goal"][b, u]).abs().max() <= train_toy.BLOCK_HALF + 1e-6
                assert (pixel[rows] - batch["goal"][b, v]).abs().max() <= train_toy.BLOCK_HALF + 1e-6
        assert words[2] in colours


def test_toy_named_and_other_block_patches_are_disjoint_and_cover_every_block():
    batch = train_toy.make_batch(16, seed=4)
    named, other = batch["named_patches"], batch["other_patches"]
    assert not (named & other).any()
    assert named.any(dim=1).all() and other.any(dim=1).all()   # 3 blocks: the named one and others show
    lit = batch["images"].sum(dim=2, keepdim=True).gt(0).float().flatten(0, 1)   # [B 3, 1, H, W] block pixels
    any_block = torch.nn.functional.max_pool2d(lit, train_toy.PATCH).view(16, -1).bool()
    assert torch.equal(named | other, any_block)


def test_toy_other_instruction_on_the_same_scene_changes_the_target():
    a = train_toy.make_batch(8, seed=5, named=torch.zeros(8, dtype=torch.long))
    b = train_toy.make_batch(8, seed=5, named=torch.ones(8, dtype=torch.long))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["state"], b["state"])
    assert not torch.equal(a["text_ids"], b["text_ids"])
    assert ((a["goal"] - b["goal"]).norm(dim=-1) >= train_toy.MIN_SEPARATION - 1e-6).all()
    assert not torch.isclose(a["actions"][..., :3], b["actions"][..., :3]).all(dim=(1, 2)).any()
    pick = train_toy.make_batch(8, seed=5, verb=torch.zeros(8, dtype=torch.long))
    assert pick["actions"][..., 3].eq(1.0).all()


def test_toy_run_lowers_the_loss_and_ends_with_one_json_line():
    lines = []
    train_toy.main(["--steps", "20", "--no-maps"] + TOY_ARGS, log=lines.append)
    losses = [float(l.split("loss ")[1].split()[0]) for l in lines if " loss " in l]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    result = json.loads(lines[-1])
    assert result["mode"] == "lfp" and result["steps"] == 20
    assert 0 <= result["success"] <= 1 and result["l1"] > 0
    assert set(result["kept_share"]) == set(result["kept_share_other"]) == set(result["chance"]) \
        == {"1", "2", "3", "4", "5", "6"}
    assert result["chance"]["6"] == pytest.approx(int(192 * 0.2) / 192, abs=1e-4)


def test_toy_keep_maps_mark_the_named_blocks_patches():
    model = CogVLA(train_toy.toy_config())
    data = train_toy.make_batch(2, seed=9)
    text = train_toy.keep_maps(model, data, "cpu", sample=0)
    rows = [line for line in text.splitlines() if line.startswith(("layer", " " * 8)) and ("#" in line or "." in line)]
    assert len(rows) == 6 * 8                                  # 6 LFP layers x 8 patch rows
    brackets = sum(line.count("[") for line in rows)
    assert brackets == 6 * int(data["named_patches"][0].sum())  # the named block's patches, at every layer


def checkpoint_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_toy_resume_after_an_interruption_ends_with_the_same_weights(tmp_path, monkeypatch):
    args = ["--steps", "4", "--save-every", "2", "--no-maps"] + TOY_ARGS
    train_toy.main(args + ["--out", str(tmp_path / "a")], log=lambda *_: None)

    real = train_toy.make_batch

    def interrupted(batch_size, seed, **kw):   # Ctrl-C while step 3's batch is made (seed 0: step k has seed k)
        if seed == 3:
            raise KeyboardInterrupt
        return real(batch_size, seed, **kw)

    monkeypatch.setattr(train_toy, "make_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_toy.main(args + ["--out", str(tmp_path / "b")], log=lambda *_: None)
    assert checkpoint_weights(tmp_path / "b" / "lfp.pt")["step"] == 3
    monkeypatch.setattr(train_toy, "make_batch", real)
    train_toy.main(args + ["--out", str(tmp_path / "b"), "--resume"], log=lambda *_: None)

    a, b = checkpoint_weights(tmp_path / "a" / "lfp.pt"), checkpoint_weights(tmp_path / "b" / "lfp.pt")
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not os.path.exists(tmp_path / "b" / "lfp.pt.tmp")


@pytest.mark.parametrize("dense, cause", [(True, "non-finite loss nan"), (False, "LFP layer 1: inf or NaN")])
def test_toy_non_finite_values_stop_naming_the_step_and_keep_the_last_checkpoint(tmp_path, monkeypatch, dense, cause):
    real = train_toy.make_batch

    def poisoned(batch_size, seed, **kw):
        batch = real(batch_size, seed, **kw)
        if batch_size == 4 and seed == 4:       # the 5th training batch (seed 0: step k has seed k)
            batch["state"][0, 0] = float("nan")
        return batch

    monkeypatch.setattr(train_toy, "make_batch", poisoned)
    with pytest.raises(FloatingPointError, match=f"stopping at step 4: {cause}.*last good checkpoint"):
        train_toy.main(["--steps", "8", "--save-every", "2", "--no-maps", "--out", str(tmp_path)] + TOY_ARGS
                       + (["--dense"] if dense else []), log=lambda *_: None)
    assert checkpoint_weights(tmp_path / ("dense.pt" if dense else "lfp.pt"))["step"] == 4


def test_toy_resume_refuses_other_flags(tmp_path):
    train_toy.main(["--steps", "1", "--no-maps", "--out", str(tmp_path)] + TOY_ARGS, log=lambda *_: None)
    with pytest.raises(SystemExit, match="--seed=0, this run has 1"):
        train_toy.main(["--steps", "1", "--seed", "1", "--out", str(tmp_path), "--resume"] + TOY_ARGS,
                       log=lambda *_: None)


def test_toy_trains_with_two_processes_under_torchrun():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train_toy.py", "--steps", "2", "--no-maps"] + TOY_ARGS,
        capture_output=True, text=True, timeout=120, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    json_lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(json_lines) == 1                                 # rank 0 alone prints
    assert json.loads(json_lines[0])["steps"] == 2
    assert "2 process(es)" in proc.stdout
