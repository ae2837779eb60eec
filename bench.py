"""Dense vs LFP timing of CogVLA-mini's decoder, beside the FLOP bound: `python bench.py`."""

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
    # No value checks: each would make the LFP path wait for the GPU where dense does not.
    if full:
        return CogVLAConfig.full(schedule=schedule, check_values=False)
    heads = max(1, width // 64)
    return CogVLAConfig.tiny(schedule=schedule, d_model=width, n_heads=heads, n_kv_heads=heads,
                             d_ff=int(width * 11008 / 4096), attn_impl="sdpa", check_values=False)


def build_decoder(cfg: CogVLAConfig, device, dtype) -> LlamaDecoder:
    """Build straight on `device` in `dtype`: at the source's size a float32 copy on the CPU
    first would take 27 GB."""
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


def benchmark(schedules=("source", REFERENCE_SCHEDULE), width=512, batch=4, full=False, device="cpu",
              reps=9, warmup=1, passes=("forward", "forward+backward"), out=print) -> list[dict]:
    """Median ms of dense and LFP runs, interleaved, next to the FLOP bound. Returns one dict per
    (schedule, pass) and prints it as a JSON line."""
    if full and torch.device(device).type != "cuda":
        raise ValueError(f"full=True is the source's 6.7B-parameter decoder (13 GB in bf16): it needs a GPU, "
                         f"got device {device!r}; use a smaller width on the CPU")
    results = []
    dtype = torch.bfloat16 if full else torch.float32
    for schedule in schedules:
        cfg = bench_config(schedule, width, full)
        torch.manual_seed(0)
        llm = build_decoder(cfg, device, dtype)
        embeds = torch.randn(batch, cfg.seq_len, cfg.d_model, device=device, dtype=dtype)
        bound = account(cfg, batch).speedup_bound  # the same for backward: every matmul costs 2x more there

        def run(prune, backward):
            if not backward:
                with torch.no_grad():
                    llm(embeds, prune=prune)
                return
            llm.zero_grad(set_to_none=True)
            llm(embeds, prune=prune).float().square().mean().backward()

        for pass_name in passes:
            backward = pass_name == "forward+backward"
            for _ in range(warmup):
                run(False, backward), run(True, backward)
            times = {False: [], True: []}
            for rep in range(reps):   # interleaved, alternating which goes first
                for prune in ((False, True) if rep % 2 == 0 else (True, False)):
                    times[prune].append(time_ms(lambda: run(prune, backward), device))
            dense_ms, lfp_ms = median(times[False]), median(times[True])
            # The speedup is the median of the per-repetition ratios: a dense run and the LFP run
            # next to it share the machine's momentary speed, which the ratio cancels.
            ratios = sorted(d / l for d, l in zip(times[False], times[True]))
            speedup = median(ratios)
            row = dict(schedule=schedule, **{"pass": pass_name}, device=str(device), width=cfg.d_model,
                       batch=batch, dtype=str(dtype).replace("torch.", ""), dense_ms=round(dense_ms, 2),
                       lfp_ms=round(lfp_ms, 2), speedup=round(speedup, 3), speedup_min=round(ratios[0], 3),
                       speedup_max=round(ratios[-1], 3), bound=round(bound, 3),
                       efficiency=round(speedup / bound, 3), reps=reps)
            if backward:
                for prune, key in ((False, "dense_saved_mib"), (True, "lfp_saved_mib")):
                    row[key] = round(saved_activation_bytes(llm, lambda: run(prune, True)) / 2**20, 1)
            if torch.device(device).type == "cuda":
                for prune, key in ((False, "dense_peak_mib"), (True, "lfp_peak_mib")):
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    run(prune, backward)
                    row[key] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            results.append(row)
            out(json.dumps(row))
        del llm
    return results


def profile_lfp_layer(schedule=REFERENCE_SCHEDULE, layer=20, width=512, batch=4, device="cpu", reps=11,
                      out=print) -> dict[str, float]:
    """Where one LFP layer's forward time goes: the real `forward_lfp`, timed whole (median ms)
    next to a standard layer on all N tokens and on K tokens (the ideal it approaches), then
    split by operator with torch.profiler (self time per call of the layer)."""
    cfg = bench_config(schedule, width, full=False)
    torch.manual_seed(0)
    llm = build_decoder(cfg, device, torch.float32)
    lfp = llm.layers[layer]
    x = torch.randn(batch, cfg.seq_len, cfg.d_model, device=device)       # [B, N, D]
    pos = torch.arange(cfg.seq_len, device=device)[None]                  # [1, N]
    K = lfp.n_keep
    cos, sin = llm.rotary_emb(pos, x.dtype)                               # [1, N, Dh]
    runs = {
        "LFP layer (forward_lfp)": lambda: lfp.forward_lfp(x, pos, llm.rotary_emb),
        "standard layer on N tokens": lambda: DecoderLayer.forward(lfp, x, cos, sin, attention_mask(cfg, pos)),
        "standard layer on K tokens": lambda: DecoderLayer.forward(lfp, x[:, :K], cos[:, :K], sin[:, :K],
                                                                  attention_mask(cfg, pos[:, :K])),
    }
    timings = {}
    with torch.no_grad():
        for name, fn in runs.items():
            fn()
            timings[name] = median([time_ms(fn, device) for _ in range(reps)])
        gpu = torch.device(device).type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(reps):
                runs["LFP layer (forward_lfp)"]()
            synchronize(device)
    ops = {e.key: (e.self_device_time_total if gpu else e.self_cpu_time_total) / 1e3 / reps
           for e in prof.key_averages()}
    ops = dict(sorted(((k, v) for k, v in ops.items() if v > 0), key=lambda kv: -kv[1]))
    out(f"\nLFP layer {layer} ({schedule}, N={cfg.seq_len}, K={K}, d_model {width}, batch {batch}, {device}, "
        f"median of {reps}):")
    for name, ms in timings.items():
        out(f"  {name:<34} {ms:8.3f} ms")
    out(f"  where forward_lfp's time goes, by operator ({'GPU' if gpu else 'CPU'} self time per call):")
    for name, ms in list(ops.items())[:12]:
        out(f"    {name[:44]:<44} {ms:8.3f} ms  {ms / sum(ops.values()):6.1%}")
    return {**timings, **{f"op {k}": v for k, v in ops.items()}}


def print_benchmark_table(rows):
    print(f"\n{'schedule':<28} {'pass':<17} {'dense ms':>9} {'LFP ms':>9} {'measured':>9} {'(min-max)':>13} "
          f"{'bound':>7} {'efficiency':>10}")
    for r in rows:
        print(f"{r['schedule']:<28} {r['pass']:<17} {r['dense_ms']:>9.1f} {r['lfp_ms']:>9.1f} "
              f"{r['speedup']:>8.3f}x {r['speedup_min']:>6.2f}-{r['speedup_max']:<5.2f} "
              f"{r['bound']:>6.3f}x {r['efficiency']:>10.1%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--width", type=int, default=512, help="d_model of the benchmarked decoder")
    parser.add_argument("--batch", type=int, default=4, help="batch size of the benchmark")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions, dense and LFP interleaved")
    parser.add_argument("--full", action="store_true", help="the source's size (d_model 4096), bf16; for a GPU")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    print(f"benchmark: LlamaDecoder alone (the LFP part), the source's layout, 32 layers, "
          f"{'d_model 4096 bf16' if args.full else f'd_model {args.width} float32'}, batch {args.batch}, "
          f"device {args.device}, median of {args.reps}, dense and LFP interleaved")
    if not args.full:
        profile_lfp_layer(width=args.width, batch=args.batch, device=args.device)
    try:
        rows = benchmark(width=args.width, batch=args.batch, full=args.full, device=args.device, reps=args.reps)
    except ValueError as err:   # --full without a GPU
        raise SystemExit(str(err))
    print_benchmark_table(rows)
