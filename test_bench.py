"""Executable claims about bench.py: the timing runs at toy size, the measured bound, the
compiled check."""

import dataclasses
import json
import re

import pytest
import torch

import bench
import cogvla_mini as cm
from exercises import assert_close


def test_benchmark_runs_at_toy_size_and_ends_with_json_lines():
    lines, progress = [], []
    rows = bench.benchmark(width=64, batch=2, reps=3, warmup=0, out=lines.append, progress=progress.append)
    parsed = [json.loads(line) for line in lines]
    assert parsed == rows
    assert [(r["schedule"], r["pass"], r["mode"]) for r in rows] == [
        (s, p, "eager") for s in ("source", cm.REFERENCE_SCHEDULE) for p in ("forward", "forward+backward")]
    # A line per repetition: what runs, the pair's ratio, how long is left.
    pattern = (r"(\S+) (forward(?:\+backward)?) eager rep [123]/3: dense ([\d.]+) ms, LFP ([\d.]+) ms, "
               r"bound ([\d.]+) ms, ratio ([\d.]+)  \(ETA \d+ s\)")
    assert len(progress) == 4 * 3 and all(re.fullmatch(pattern, p) for p in progress), progress
    ratios, bounds = {}, {}
    for p in progress:
        schedule, pass_name, dense, _, bound, ratio = re.fullmatch(pattern, p).groups()
        ratios.setdefault((schedule, pass_name), []).append(float(ratio))
        bounds.setdefault((schedule, pass_name), []).append(float(dense) / float(bound))
    for r in rows:
        assert r["lfp_ms_per_chunk"] == pytest.approx(r["lfp_ms"] / 2, abs=0.01)
        assert r["speedup"] == pytest.approx(sorted(ratios[r["schedule"], r["pass"]])[1], abs=2e-3)  # the median
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["bound"], rel=0.01)
        # The measured bound is the median of dense / bound, rounded ms in the log line aside.
        assert r["measured_bound"] == pytest.approx(sorted(bounds[r["schedule"], r["pass"]])[1], rel=0.05)
        assert r["efficiency_measured"] == pytest.approx(r["speedup"] / r["measured_bound"], rel=0.01)
        cfg = bench.bench_config(r["schedule"], 64, full=False)
        assert r["bound"] == pytest.approx(cm.account(cfg, 1).speedup_bound, abs=1e-3)
    backward = [r for r in rows if r["pass"] == "forward+backward"]
    assert all(r["dense_saved_mib"] > 0 and r["lfp_saved_mib"] > 0 for r in backward)
    timings = bench.profile_lfp_layer(width=64, batch=1, reps=1, out=lines.append)
    assert timings["LFP layer (forward_lfp)"] > 0 and timings["standard layer on K tokens"] > 0
    # The profile is of the real forward_lfp: its top-k, gather (indexing) and scatter (index_put_) show up by name.
    assert {"op aten::topk", "op aten::index", "op aten::index_put_"} <= set(timings)


def test_the_measured_bound_runs_each_layer_on_exactly_the_tokens_lfp_keeps_there():
    """The bound's layers see K tokens where LFP keeps K (N elsewhere), in the order of the layers,
    and the tokens past K come out as they went in."""
    cfg = cm.CogVLAConfig.tiny(schedule={1: 0.5, 3: 0.25}, n_layers=5, d_model=32, n_heads=2, n_kv_heads=2,
                               d_ff=48, attn_impl="sdpa", check_values=False)
    llm = cm.LlamaDecoder(cfg).eval()
    x = torch.randn(2, cfg.seq_len, cfg.d_model)
    calls, real = [], cm.DecoderLayer.forward      # called as a function: nn.Module's hooks never see it

    def counting(self, x, *rest):
        calls.append(x.shape[1])
        return real(self, x, *rest)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench.DecoderLayer, "forward", counting)
        got = bench.bound_forward(llm, x)
    N, V = cfg.seq_len, cfg.n_vision
    assert calls == [N, N - V + int(V * 0.5), N, N - V + int(V * 0.25), N]
    assert got.shape == x.shape
    # One layer: the tokens past K leave the layer as they came; the first K are a standard block's output.
    one = cm.LlamaDecoder(dataclasses.replace(cfg, n_layers=1, schedule={0: 0.25})).eval()
    one.norm = torch.nn.Identity()
    K = one.layers[0].n_keep
    with torch.no_grad():
        out = bench.bound_forward(one, x)
        pos = torch.arange(K)[None]
        cos, sin = one.rotary_emb(pos, x.dtype)
        want = real(one.layers[0], x[:, :K], cos, sin, cm.attention_mask(cfg, pos))
    assert torch.equal(out[:, K:], x[:, K:])
    assert_close(out[:, :K], want, 1e-6, what="the bound's layer on its first K tokens")


def test_compiled_timing_checks_the_compiled_decoder_against_eager_first(monkeypatch):
    """bench.py --compile times nothing before each compiled decoder's output matches eager's (a
    real compile takes minutes on a CPU: here torch.compile is stood in for, right then wrong)."""
    cfg = bench.bench_config("source", 64, full=False)
    llm = bench.build_decoder(dataclasses.replace(cfg, n_layers=32), "cpu", torch.float32)
    x = torch.randn(1, cfg.seq_len, cfg.d_model)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    lines = []
    functions, seconds = bench.compiled_forwards(llm, x, "cpu", out=lines.append)
    with torch.no_grad():
        assert torch.equal(functions["LFP"](x), llm(x, prune=True))
        assert torch.equal(functions["bound"](x), bench.bound_forward(llm, x))
    assert set(seconds) == {"dense", "LFP", "bound"}
    assert len(lines) == 3 and "largest difference from eager 0 (tolerance 0.001)" in lines[1]
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda x: fn(x) + 0.01)   # a wrong graph
    with pytest.raises(RuntimeError, match="dense decoder differs from eager by 0.01 .*not timing"):
        bench.compiled_forwards(llm, x, "cpu", out=lines.append)


def test_full_size_benchmark_is_refused_without_a_gpu():
    with pytest.raises(ValueError, match="needs a GPU, got device 'cpu'"):
        bench.benchmark(full=True, device="cpu")
