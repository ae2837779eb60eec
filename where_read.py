"""Where does a trained toy policy's action read the named block? Do the routers' choices matter?

A kept share says what the router kept, not what the action used: this evaluates
the trained LFP model again with the named block withheld from chosen layers, with random router
choices of as many tokens, and with nothing pruned.

    python where_read.py                       # train as `python train_toy.py` would, then study
    python where_read.py --layout every --seed 1     # any of train_toy.py's flags
    python where_read.py --checkpoint runs/x/lfp.pt  # a model train_toy.py --out saved
"""

import argparse
import contextlib
import json
import sys

import torch
import torch.nn.functional as F

import cogvla_mini
from cogvla_mini import CogVLA
import train_toy
from train_toy import evaluate


# %% The interventions ==========================================================================

@contextlib.contextmanager
def patches_withheld(model: CogVLA, patches, drop_at=(), hide_at=()):
    """Withhold some vision patches (patches [B, V] bool, e.g. the named block's) from chosen
    layers, for the passes run inside: at each LFP layer in `drop_at` the router must drop them
    (their keep probability is set to -1, below any real one, before the top-k); at each
    standard layer in `hide_at` the tokens after the vision segment (text, state, action
    queries) may not attend to them. The vision tokens still see each other."""
    cfg, layers = model.cfg, model.llm.layers
    lfp = sorted(cfg.lfp_ratios)                                            # the LFP layers
    for name, ids, ok in (("drop_at", drop_at, True), ("hide_at", hide_at, False)):
        for i in ids:
            if (i in lfp) != ok:
                raise ValueError(f"{name}: layer {i} is {'not ' if ok else ''}an LFP layer; drop_at "
                                 f"takes LFP layers {lfp}, hide_at the standard ones")

    def drop(router, inputs, keep_prob):                                    # keep_prob [B, N]
        keep_prob = keep_prob.clone()
        # keep_prob[:, a:b] is a view: the boolean assignment writes into keep_prob itself.
        keep_prob[:, cfg.vision_start:cfg.text_start][patches] = -1.0
        return keep_prob

    def hide(layer, inputs):                                                # layer(x, cos, sin, mask)
        x, cos, sin, mask = inputs
        N = x.shape[1]
        withheld_cols = F.pad(patches, (cfg.vision_start, N - cfg.text_start))  # [B, N] keys
        reader_rows = torch.arange(N, device=x.device) >= cfg.text_start     # [N] text, state, queries
        blocked = reader_rows[None, :, None] & withheld_cols[:, None, :]     # [B, N, N]
        return x, cos, sin, mask & ~blocked[:, None]                         # [B, 1, N, N]

    hooks = [layers[i].router.register_forward_hook(drop) for i in drop_at]
    hooks += [layers[i].register_forward_pre_hook(hide) for i in hide_at]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def router_choice_replaced(patches=None, seed=0, as_the_router=False):
    """For the passes run inside, every LFP layer keeps a random choice of as many tokens as its
    router would (BOS, text and action still forced in; the router's probabilities still weight
    the MLPs); with `patches` [B, V] (the named block's, say), a random choice that always keeps
    those; with `as_the_router` too, one that keeps and drops those patches where the router
    does, and chooses the rest at random. If success falls under a random choice but not under
    one that keeps the named block, the router's choice matters, and for finding the block."""
    generator, real = torch.Generator().manual_seed(seed), cogvla_mini.select

    def random_choice(keep_prob, k, cfg):
        scores = torch.rand(keep_prob.shape, generator=generator).to(keep_prob.device)   # [B, N]
        if patches is not None:
            bonus = 2.0 * patches                             # above any other patch
            if as_the_router:                                 # and below any, where it drops them
                routed = torch.zeros_like(scores, dtype=torch.bool).scatter(
                    1, real(keep_prob, k, cfg), True)[:, cfg.vision_start:cfg.text_start]
                bonus = torch.where(routed, 2.0, -2.0) * patches
            scores[:, cfg.vision_start:cfg.text_start] += bonus
        return real(scores, k, cfg)

    cogvla_mini.select = random_choice       # forward_lfp calls the module's select
    try:
        yield
    finally:
        cogvla_mini.select = real


def where_the_block_is_read(model: CogVLA, data: dict, as_trained: dict, device, log=print) -> dict:
    """If success holds when the router may not keep the named block at a layer, the action does
    not need it there, whatever the keep shares say. The control withholds the two other blocks
    the same way: a model put into conditions it never saw may fail for that reason alone, and
    the control shows how much. `as_trained`: the metrics of the same data with nothing withheld."""
    lfp = sorted(model.cfg.lfp_ratios)
    standard = [i for i in range(model.cfg.n_layers) if i not in lfp]

    def listed(ids):
        return ", ".join(map(str, ids))
    named, other = "named block", "other blocks (control)"
    cases = {f"{named} dropped at LFP layers {listed(lfp[-2:])}": ("named_patches", dict(drop_at=lfp[-2:])),
             f"{named} dropped at LFP layers {listed(lfp)}": ("named_patches", dict(drop_at=lfp)),
             f"{other} dropped at LFP layers {listed(lfp)}": ("other_patches", dict(drop_at=lfp))}
    cases.update({f"{named} hidden at standard layer {i}": ("named_patches", dict(hide_at=[i]))
                  for i in standard})
    if standard:
        cases[f"{named} hidden at standard layers {listed(standard)}"] = ("named_patches",
                                                                         dict(hide_at=standard))
        cases[f"{other} hidden at standard layers {listed(standard)}"] = ("other_patches",
                                                                         dict(hide_at=standard))
    cases["a random choice at every LFP layer, of as many tokens"] = (None, {})
    cases["a random choice, always keeping the named block's patches"] = ("named_patches", {})
    cases["a random choice, the named block's patches kept where the router keeps them"] = (
        "named_patches", dict(as_the_router=True))
    log(f"which layers the action needs the named block in ({len(data['state'])} held-out scenes; "
        f"dropped: the router may not keep those patches; hidden: text, state and queries may "
        f"not attend to them):")
    keys = ("nearest", "success", "success_015")
    results, width = {"as trained": {k: as_trained[k] for k in keys}}, max(map(len, cases))
    dense = evaluate(model, data, prune=False, device=device)   # the same weights, nothing pruned
    results["as trained, but run dense (no token pruned)"] = {k: dense[k] for k in keys}
    for name, (which, where) in cases.items():
        # One batch of all the scenes, so that the withheld patches line up with it.
        patches = data[which].to(device) if which else None
        with (router_choice_replaced(patches, **where) if name.startswith("a random") else
              patches_withheld(model, patches, **where)):
            m = evaluate(model, data, prune=True, device=device, batch_size=len(data["state"]))
        results[name] = {k: m[k] for k in keys}
    for name, m in results.items():
        log(f"  {name:<{width}} nearest {m['nearest']:6.1%}  success {m['success']:6.1%}  "
            f"within 0.15 {m['success_015']:6.1%}")
    return results


# %% Main ======================================================================================

def study_checkpoint(path: str, device: str, log=train_toy.say) -> dict:
    """Rebuild the policy a train_toy.py run saved, evaluate it on its own held-out scenes, study."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise SystemExit(f"--checkpoint: cannot read {path} as a train_toy.py checkpoint ({err})")
    args = argparse.Namespace(**ckpt["args"])
    if args.dense or args.tokens != "patch":
        raise SystemExit(f"--checkpoint: {path} is a {'dense' if args.dense else 'agg-token'} "
                         f"model; the study withholds patches from an LFP model on patch tokens")
    policy = train_toy.ToyPolicy(train_toy.toy_config(args.tokens, not args.no_film, args.layout))
    policy.load_state_dict(ckpt["model"])
    model, data = policy.vla.to(device), train_toy.held_out(args)
    metrics = evaluate(model, data, prune=True, device=device)
    log(f"{path}: step {ckpt['step']}, seed {args.seed}, {args.layout} layout; held-out success "
        f"{metrics['success']:.1%}")
    return dict(metrics, where_read=where_the_block_is_read(model, data, metrics, device, log))


def main(argv=None, log=train_toy.say) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Every other flag "
                                "is train_toy.py's (python train_toy.py --help).")
    p.add_argument("--checkpoint", help="study this saved LFP model instead of training one")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    own, rest = p.parse_known_args(argv)
    if own.checkpoint:
        if rest:
            p.error(f"--checkpoint studies a saved model as it was trained: leave out "
                    f"{' '.join(rest)}")
        result = study_checkpoint(own.checkpoint, own.device, log)
        log(json.dumps(result))
        return result
    args = train_toy.parse_args(argv)
    if args.tokens == "agg" or args.dense:
        p.error("the study withholds the named block's patches from an LFP model: it needs "
                "--tokens patch and no --dense")
    return train_toy.main(argv, log, study=where_the_block_is_read)


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as err:
        sys.exit(str(err))
    except KeyboardInterrupt:
        sys.exit(130)
