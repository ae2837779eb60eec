"""Dense vs LFP timing of CogVLA-mini's decoder, beside two bounds: `python bench.py`.

    python bench.py                      # batch 4, forward and forward+backward, eager
    python bench.py --batch 1            # a robot's case: one action chunk per control step
    python bench.py --compile            # the forward also through torch.compile, side by side
    python bench.py --full --device cuda # the source's full size, bf16, on a GPU

The same weights run dense (prune=False), with LFP, and as the measured bound (each layer a
standard block on as many tokens as LFP keeps there), interleaved repetition by repetition.
LFP's speedup (the median of the paired ratios dense / LFP) stands beside two bounds: the
measured one (dense / bound) and account()'s FLOP bound. The gap from the FLOP bound to the
measured one is the machine's (fewer rows use it less well); from the measured bound to LFP's
speedup it is LFP's own work (router, top-k, gathers, mask, scatter).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cogvla_mini import (REFERENCE_SCHEDULE, CogVLAConfig, DecoderLayer, LlamaDecoder, account,
                         attention_mask)


def bench_config(schedule, width: int, full: bool) -> CogVLAConfig:
    """The source's layout (256 tokens, 32 layers) at `width`, Llama-2's proportions
    (head dim 64 here, MLP 11008/4096 x width); `full` is the source's own size."""
    # No value checks: each would make the LFP path wait for the GPU where dense does not, and
    # a compiled graph would break at each.
    if full:
        return CogVLAConfig.full(schedule=schedule, check_values=False)
    heads = max(1, width // 64)
    return CogVLAConfig.tiny(schedule=schedule, d_model=width, n_heads=heads, n_kv_heads=heads,
                             d_ff=int(width * 11008 / 4096), attn_impl="sdpa", check_values=False)


def build_decoder(cfg: CogVLAConfig, device, dtype) -> LlamaDecoder:
    """Build straight on `device` in `dtype`: at the source's size a float32 copy on the CPU
    first would need 27 GB (6.7 B parameters x 4 bytes)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaDecoder(cfg)
    finally:
        torch.set_default_dtype(previous)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median(values):
    return sorted(values)[len(values) // 2]


def time_ms(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def saved_activation_bytes(llm: LlamaDecoder, fn) -> int:
    """Bytes of the tensors autograd keeps for backward (activations, not weights): the
    training memory that pruning could shrink, measurable the same way on any device."""
    weights = {p.untyped_storage().data_ptr() for p in llm.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def bound_forward(llm: LlamaDecoder, embeds):
    """The measured bound: each layer a standard block on as many tokens as it keeps under LFP
    (its first K: no router, no gather, no scatter), the other N - K passed on with a `cat`
    (a copy, as LFP's scatter is): what LFP's layers would cost if its own work were free."""
    N = embeds.shape[1]
    positions = torch.arange(N, device=embeds.device)[None]               # [1, N]
    cos, sin = llm.rotary_emb(positions, embeds.dtype)                    # [1, N, Dh]
    mask = attention_mask(llm.cfg, positions)                             # [1, 1, N, N]
    x = embeds
    for layer in llm.layers:
        K = getattr(layer, "n_keep", N)                                   # LFP layers keep K
        y = DecoderLayer.forward(layer, x[:, :K], cos[:, :K], sin[:, :K], mask[..., :K, :K])
        x = y if K == N else torch.cat([y, x[:, K:]], dim=1)              # [B, N, D]
    return llm.norm(x)


def forwards(llm: LlamaDecoder) -> dict:
    """What the benchmark times, by name: the decoder dense, with LFP, and the measured bound."""
    return {"dense": lambda x: llm(x, prune=False), "LFP": lambda x: llm(x, prune=True),
            "bound": lambda x: bound_forward(llm, x)}


COMPILED_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}   # largest |compiled - eager|


def compiled_forwards(llm: LlamaDecoder, embeds, device, out=print):
    """forwards(llm) through torch.compile (CUDA graphs on a GPU), each compiled (its time
    reported) and checked against eager before anything is timed: ({name: compiled function},
    {name: compile seconds}). A compiled output that differs from eager by more than
    COMPILED_TOLERANCE raises: a fast wrong graph is not a result."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
    functions, seconds = {}, {}
    for name, eager in forwards(llm).items():
        compiled = torch.compile(eager, mode=mode, fullgraph=True)
        start = time.perf_counter()
        with torch.no_grad():
            got, want = compiled(embeds), eager(embeds)
            synchronize(device)
        seconds[name] = time.perf_counter() - start
        diff = (got.float() - want.float()).abs().max().item()
        tol = COMPILED_TOLERANCE[embeds.dtype]
        if not diff <= tol:
            raise RuntimeError(f"torch.compile's {name} decoder differs from eager by {diff:.3g} "
                               f"(tolerance {tol:g}): not timing a graph that computes something else")
        out(f"compiled the {name} decoder in {seconds[name]:.0f} s; largest difference from eager "
            f"{diff:.2g} (tolerance {tol:g})")
        functions[name] = compiled
    return functions, seconds


def benchmark(schedules=("source", REFERENCE_SCHEDULE), width=512, batch=4, full=False,
              device="cpu", reps=9, warmup=1, passes=("forward", "forward+backward"),
              compile=False, out=print, progress=print) -> list[dict]:
    """Median ms of dense, LFP and the measured bound, interleaved, next to the FLOP bound. One
    row per (schedule, pass, eager or compiled), each printed as a JSON line by `out`; a line
    per repetition goes to `progress`."""
    if full and torch.device(device).type != "cuda":
        raise ValueError(f"full=True is the source's 6.7B-parameter decoder (13 GB in bf16): it "
                         f"needs a GPU, got device {device!r}; use a smaller width on the CPU")
    results, started = [], time.perf_counter()
    dtype = torch.bfloat16 if full else torch.float32
    plan = [(s, p, m) for s in schedules for p in passes
            for m in (("eager", "compiled") if compile and p == "forward" else ("eager",))]
    done = 0
    for schedule in schedules:
        cfg = bench_config(schedule, width, full)
        torch.manual_seed(0)
        llm = build_decoder(cfg, device, dtype)
        embeds = torch.randn(batch, cfg.seq_len, cfg.d_model, device=device, dtype=dtype)
        bound = account(cfg, batch).speedup_bound  # the same for backward: every matmul costs 2x there
        eager = forwards(llm)
        compiled, compile_s = compiled_forwards(llm, embeds, device, progress) if compile else ({}, {})

        def run(name, backward, mode):
            if backward:
                llm.zero_grad(set_to_none=True)
                eager[name](embeds).float().square().mean().backward()
                return
            with torch.no_grad():
                (compiled if mode == "compiled" else eager)[name](embeds)

        for pass_name, mode in [(p, m) for s, p, m in plan if s == schedule]:
            backward = pass_name == "forward+backward"
            names = list(eager)
            for _ in range(warmup):
                for name in names:
                    run(name, backward, mode)
            times = {name: [] for name in names}
            for rep in range(reps):   # interleaved, each repetition starting one later
                for name in names[rep % 3:] + names[:rep % 3]:
                    times[name].append(time_ms(lambda: run(name, backward, mode), device))
                left = (time.perf_counter() - started) / (done + (rep + 1) / reps) * (len(plan) - done
                                                                                    - (rep + 1) / reps)
                last = {name: t[-1] for name, t in times.items()}
                progress(f"{schedule} {pass_name} {mode} rep {rep + 1}/{reps}: dense "
                         f"{last['dense']:.1f} ms, LFP {last['LFP']:.1f} ms, bound "
                         f"{last['bound']:.1f} ms, ratio {last['dense'] / last['LFP']:.3f}  "
                         f"(ETA {left:.0f} s)")
            done += 1
            # Speedups are medians of per-repetition ratios: runs next to each other share the
            # machine's momentary speed, which the ratio cancels.
            ratios = sorted(d / l for d, l in zip(times["dense"], times["LFP"]))
            speedup = median(ratios)
            measured_bound = median([d / b for d, b in zip(times["dense"], times["bound"])])
            dense_ms, lfp_ms, bound_ms = (median(times[n]) for n in ("dense", "LFP", "bound"))
            row = dict(schedule=schedule, **{"pass": pass_name}, mode=mode, device=str(device),
                       width=cfg.d_model, batch=batch, dtype=str(dtype).replace("torch.", ""),
                       dense_ms=round(dense_ms, 2), lfp_ms=round(lfp_ms, 2),
                       bound_ms=round(bound_ms, 2), dense_ms_per_chunk=round(dense_ms / batch, 2),
                       lfp_ms_per_chunk=round(lfp_ms / batch, 2), speedup=round(speedup, 3),
                       speedup_min=round(ratios[0], 3), speedup_max=round(ratios[-1], 3),
                       measured_bound=round(measured_bound, 3),
                       efficiency_measured=round(speedup / measured_bound, 3),
                       bound=round(bound, 3), efficiency=round(speedup / bound, 3), reps=reps)
            if mode == "compiled":
                row.update({f"{name.lower()}_compile_s": round(s, 1) for name, s in compile_s.items()})
            if backward:
                for name in ("dense", "LFP"):
                    nbytes = saved_activation_bytes(llm, lambda: run(name, True, mode))
                    row[f"{name.lower()}_saved_mib"] = round(nbytes / 2**20, 1)
            if torch.device(device).type == "cuda":
                for name in ("dense", "LFP"):
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    run(name, backward, mode)
                    row[f"{name.lower()}_peak_mib"] = (
                        round((torch.cuda.max_memory_allocated() - base) / 2**20, 1))
            results.append(row)
            out(json.dumps(row))
        del llm, compiled
    return results


def profile_lfp_layer(schedule=REFERENCE_SCHEDULE, layer=20, width=512, batch=4, device="cpu",
                      reps=11, compile=False, out=print) -> dict[str, float]:
    """Where one LFP layer's forward time goes: the real `forward_lfp`, timed whole (median ms)
    next to a standard layer on all N tokens and on K tokens (the ideal it approaches), then
    split by operator with torch.profiler (self time per call of the layer); with `compile`,
    each of the three through torch.compile first."""
    cfg = bench_config(schedule, width, full=False)
    torch.manual_seed(0)
    llm = build_decoder(cfg, device, torch.float32)
    lfp = llm.layers[layer]
    x = torch.randn(batch, cfg.seq_len, cfg.d_model, device=device)       # [B, N, D]
    pos = torch.arange(cfg.seq_len, device=device)[None]                  # [1, N]
    K = lfp.n_keep
    cos, sin = llm.rotary_emb(pos, x.dtype)                               # [1, N, Dh]
    mask_n, mask_k = attention_mask(cfg, pos), attention_mask(cfg, pos[:, :K])
    runs = {
        "LFP layer (forward_lfp)": lambda x: lfp.forward_lfp(x, pos, llm.rotary_emb),
        "standard layer on N tokens": lambda x: DecoderLayer.forward(lfp, x, cos, sin, mask_n),
        "standard layer on K tokens": lambda x: DecoderLayer.forward(lfp, x[:, :K], cos[:, :K],
                                                                     sin[:, :K], mask_k),
    }
    if compile:
        runs = {name: torch.compile(fn, fullgraph=True) for name, fn in runs.items()}
    timings = {}
    with torch.no_grad():
        for name, fn in runs.items():
            fn(x)
            timings[name] = median([time_ms(lambda: fn(x), device) for _ in range(reps)])
        gpu = torch.device(device).type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                              if gpu else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(reps):
                runs["LFP layer (forward_lfp)"](x)
            synchronize(device)
    ops = {e.key: (e.self_device_time_total if gpu else e.self_cpu_time_total) / 1e3 / reps
           for e in prof.key_averages()}
    ops = dict(sorted(((k, v) for k, v in ops.items() if v > 0), key=lambda kv: -kv[1]))
    how = "compiled" if compile else "eager"
    out(f"\nLFP layer {layer}, {how} ({schedule}, N={cfg.seq_len}, K={K}, d_model {width}, batch "
        f"{batch}, {device}, median of {reps}):")
    for name, ms in timings.items():
        out(f"  {name:<34} {ms:8.3f} ms")
    out(f"  where forward_lfp's time goes, by operator ({'GPU' if gpu else 'CPU'} self time per call):")
    for name, ms in list(ops.items())[:12]:
        out(f"    {name[:44]:<44} {ms:8.3f} ms  {ms / sum(ops.values()):6.1%}")
    return {**timings, **{f"op {k}": v for k, v in ops.items()}}


def print_benchmark_table(rows):
    """LFP's speedup against two bounds: the FLOP bound (what the schedule's matmuls allow) and
    the measured bound (what its layers on K tokens take on this machine)."""
    print(f"\n{'schedule':<27} {'pass':<16} {'mode':<8} {'batch':>5} {'dense ms':>9} {'LFP ms':>9} "
          f"{'bound ms':>9} {'LFP':>7} {'(min-max)':>11} {'measured':>9} {'FLOP':>7} "
          f"{'LFP/meas.':>9} {'meas./FLOP':>10} {'compile s':>11}")
    for r in rows:
        compiled = (f"{r['dense_compile_s']:.0f}/{r['lfp_compile_s']:.0f}/{r['bound_compile_s']:.0f}"
                    if r["mode"] == "compiled" else "")
        print(f"{r['schedule']:<27} {r['pass']:<16} {r['mode']:<8} {r['batch']:>5} "
              f"{r['dense_ms']:>9.1f} {r['lfp_ms']:>9.1f} {r['bound_ms']:>9.1f} "
              f"{r['speedup']:>6.3f}x {r['speedup_min']:>5.2f}-{r['speedup_max']:<5.2f} "
              f"{r['measured_bound']:>8.3f}x {r['bound']:>6.3f}x {r['efficiency_measured']:>9.1%} "
              f"{r['measured_bound'] / r['bound']:>10.1%} {compiled:>11}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--width", type=int, default=512, help="d_model of the benchmarked decoder")
    parser.add_argument("--batch", type=int, default=4, help="batch size (1: one action chunk)")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions, dense and LFP "
                        "interleaved")
    parser.add_argument("--full", action="store_true", help="the source's size (d_model 4096), "
                        "bf16; for a GPU")
    parser.add_argument("--compile", action="store_true", help="also time the forward through "
                        "torch.compile (compile time reported apart, outputs checked first)")
    parser.add_argument("--forward-only", action="store_true", help="leave out forward+backward")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="leave out the profile of one LFP layer")
    args = parser.parse_args()
    for name in ("width", "batch", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if args.full and not args.device.startswith("cuda"):
        parser.error("--full is the source's 6.7B-parameter decoder (13 GB in bf16): it needs "
                     "--device cuda; use --width on the CPU")
    print(f"benchmark: LlamaDecoder alone (the LFP part), the source's layout, 32 layers, "
          f"{'d_model 4096 bf16' if args.full else f'd_model {args.width} float32'}, batch "
          f"{args.batch}, device {args.device}, median of {args.reps}, dense and LFP interleaved",
          flush=True)
    if args.profile and not args.full:
        profile_lfp_layer(width=args.width, batch=args.batch, device=args.device)
        if args.compile:
            profile_lfp_layer(width=args.width, batch=args.batch, device=args.device, compile=True)
    passes = ("forward",) if args.forward_only else ("forward", "forward+backward")
    rows = benchmark(width=args.width, batch=args.batch, full=args.full, device=args.device,
                     reps=args.reps, passes=passes, compile=args.compile,
                     progress=lambda line: print(line, flush=True))
    print_benchmark_table(rows)
