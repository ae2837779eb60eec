"""Train a small CogVLA on a synthetic reaching task, dense vs LFP, and show what LFP keeps.

The task cannot be solved without reading the instruction and looking at the right place:
three coloured blocks (of four colours) sit at random 3-D positions over a table, seen by a
top, a front and a side camera (each view shows only two of the three coordinates, so the 3-D
position needs two views; each camera sees the table in its own dark shade). The instruction
names one block by colour and a verb ("pick" or "push"); the state is the gripper's 3-D
position. The target is a chunk of 10 actions (dx, dy, dz, gripper) that moves the gripper in
equal steps onto the named block, with the gripper closed (+1) to pick and open (-1) to push.

Besides the action loss, a grounding probe (see ToyPolicy; --ground-weight, 0 turns it off)
teaches the vision tower which block the words name. The LFP routers are never given labels.

    python train_toy.py                 # LFP, patch tokens, a few minutes on 2 CPU cores
    python train_toy.py --compare       # dense and LFP from the same seed, side by side
    python train_toy.py --no-film       # LFP without the router's FiLM (the ablation)
    python train_toy.py --tokens agg    # CogVLA's aggregation tokens instead of patches
    torchrun --standalone --nproc_per_node=2 train_toy.py   # DistributedDataParallel
    python where_read.py                # train so, then: where does the action read the block?

Everything is generated here; nothing is downloaded. The last line printed is one JSON
object with the final metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import cogvla_mini
import report
from cogvla_mini import SOURCE_SCHEDULE, CogVLA, CogVLAConfig

# %% The synthetic task ========================================================================

VOCAB = ["<pad>", "<bos>", "pick", "push", "the", "red", "green", "blue", "yellow", "block"]
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.9),
          "yellow": (0.9, 0.85, 0.1)}
VERBS = {"pick": 1.0, "push": -1.0}  # the gripper value of the whole chunk
N_BLOCKS = 3                         # blocks per scene, each a different colour
IMAGE_SIZE, PATCH = 56, 7            # 8 x 8 patches per camera: 3 x 64 = 192 vision tokens
BLOCK_HALF = 0.12                    # half the block's side, in table units ([-1, 1])
MIN_SEPARATION = 0.5                 # between block centres, so reaching the wrong one fails
STEP_SCALE = 0.16                    # the longest possible step (1.6 / 10): actions are scaled by it
SUCCESS_TOLERANCE = 0.25             # success: the gripper ends this near the named block's centre
                                     # (blocks are >= 0.5 apart, so it cannot be another block)
STRICT_TOLERANCE = 0.15              # reported too, as `success_015`
# Camera k shows the coordinates VIEWS[k] (image column, image row) and looks along DEPTH[k].
VIEWS = [(0, 1), (0, 2), (1, 2)]     # top: x-y, front: x-z, side: y-z
DEPTH = [2, 1, 0]                    # top looks down z, front along y, side along x
TABLE_SHADES = (0.0, 0.05, 0.1)      # the table as each camera sees it: black, then darker greys


# Where the LFP layers sit. "source": the source's six keep ratios on layers 1..6, between
# standard layers (the last stays standard, as the source's layer 31 does). "every": every layer
# prunes from the first on, as the reference code prunes every layer from its start: no
# unpruned layer lets the action read around the routers. "route": every layer keeps a quarter
# of the vision tokens, so that a random choice of as many passes only about a quarter of the
# named block at any layer: the action finds the block only if the routers do.
LAYOUTS = {"source": dict(zip(range(1, 7), SOURCE_SCHEDULE.values())),
           "every": dict(enumerate([0.5, 0.4, 0.3, 0.25, 0.2, 0.2, 0.2, 0.2])),
           "route": dict.fromkeys(range(8), 0.25)}
STEPS = {"source": 800, "every": 700, "route": 1000}   # each layout's default --steps


def toy_config(tokens: str = "patch", film: bool = True, layout: str = "source") -> CogVLAConfig:
    """The tiny preset at 8 layers and width 48 (d_ff 128, in Llama's proportion), LFP where
    `layout` says. Width 48 learns the task in as many steps as 64 did, each step cheaper."""
    return CogVLAConfig.tiny(n_layers=8, d_model=48, d_ff=128, schedule=LAYOUTS[layout],
                             vocab_size=len(VOCAB),
                             bos_id=WORD_ID["<bos>"], image_size=IMAGE_SIZE, patch_size=PATCH,
                             n_agg_tokens=0 if tokens == "patch" else 64, router_film=film,
                             attn_impl="sdpa")


def make_batch(batch_size: int, seed: int, named=None, verb=None):
    """A batch of scenes from its own seed (so any batch can be made again, on any rank, after
    any resume). `named` [B] (which of the 3 blocks) and `verb` [B] (0 pick, 1 push) override
    the instruction of the same scenes. Returns model inputs, targets, and what evaluation
    needs."""
    g = torch.Generator().manual_seed(seed)
    B = batch_size
    # Block positions: resample any scene whose blocks come closer than MIN_SEPARATION.
    pos = torch.rand(B, N_BLOCKS, 3, generator=g) * 1.6 - 0.8                  # [B, 3 blocks, xyz]
    for _ in range(100):
        apart = (pos[:, :, None] - pos[:, None]).norm(dim=-1) + torch.eye(N_BLOCKS) * 9  # [B, 3, 3]
        bad = apart.min(dim=-1).values.min(dim=-1).values < MIN_SEPARATION      # [B]
        if not bad.any():
            break
        pos[bad] = torch.rand(int(bad.sum()), N_BLOCKS, 3, generator=g) * 1.6 - 0.8
    colors = torch.stack([torch.randperm(len(COLORS), generator=g)[:N_BLOCKS] for _ in range(B)])
    target = torch.randint(0, N_BLOCKS, (B,), generator=g)                     # which block is named
    verb_ = torch.randint(0, len(VERBS), (B,), generator=g)
    state = torch.rand(B, 3, generator=g) * 1.6 - 0.8                           # gripper position
    target = target if named is None else torch.as_tensor(named)
    verb = verb_ if verb is None else torch.as_tensor(verb)

    images, block_id = render(pos, colors)                        # [B, 3, 3, H, W], [B, 3, H, W]
    color_names, verb_names = list(COLORS), list(VERBS)
    text_ids = torch.zeros(B, 20, dtype=torch.long)
    for b in range(B):
        words = [verb_names[verb[b]], "the", color_names[colors[b, target[b]]], "block"]
        # Tiled to the 20 text tokens rather than padded: both FiLMs read the text's average,
        # which 16 pads would dilute five-fold.
        text_ids[b] = torch.tensor([WORD_ID[w] for w in words] * 5)
    goal = pos[torch.arange(B), target]                                        # [B, 3]
    # Like OpenVLA's action normalisation, each step is scaled to [-1, 1] so that position
    # errors weigh in the L1 loss as much as gripper errors do.
    steps = ((goal - state) / 10 / STEP_SCALE)[:, None].expand(B, 10, 3)      # equal steps
    grip = torch.tensor([VERBS[v] for v in verb_names])[verb][:, None, None].expand(B, 10, 1)
    actions = torch.cat([steps, grip], dim=-1)                                 # [B, 10, 4]
    # The named block's patches: any patch showing one of its visible pixels, per camera; the
    # other blocks' patches: those showing another block and nothing of the named one.
    named = (block_id == target[:, None, None, None]).float()                 # [B, 3, H, W]
    other = ((block_id >= 0) & (block_id != target[:, None, None, None])).float()
    named_patches = F.max_pool2d(named, PATCH).flatten(1).bool()              # [B, 3 x 64]
    other_patches = F.max_pool2d(other, PATCH).flatten(1).bool() & ~named_patches
    return dict(images=images, text_ids=text_ids, state=state, actions=actions, goal=goal,
                blocks=pos, target=target, named_patches=named_patches, other_patches=other_patches)


def render(pos, colors):
    """Draw each block as a square in each of the 3 views, nearest block in front (a z-buffer).
    pos [B, 3, xyz], colors [B, 3] -> images [B, 3 cams, 3, H, W], block_id [B, 3 cams, H, W]
    (-1: table)."""
    B, H = pos.shape[0], IMAGE_SIZE
    centers = (torch.arange(H) + 0.5) / H * 2 - 1                              # pixel centres
    palette = torch.tensor(list(COLORS.values()))                              # [4, 3]
    # A dark table: every colour is at least as bright as it in every channel, which one linear
    # feature can detect (on mid grey, yellow would be brighter and blue darker). Each camera
    # sees its own shade: a vision token's content then tells which camera it comes from, as the
    # ViT, shared by the three, cannot; without that the decoder could tell the views (and so
    # which coordinates a patch's place gives) only by the tokens' places in the sequence.
    shades = torch.tensor(TABLE_SHADES)[None, :, None, None, None]
    images = shades.expand(B, 3, 3, H, H).clone()                             # [B, cams, rgb, H, W]
    block_id = torch.full((B, 3, H, H), -1)
    for cam, ((u, v), d) in enumerate(zip(VIEWS, DEPTH)):
        depth = torch.full((B, H, H), float("inf"))
        for k in range(N_BLOCKS):
            cols = (centers[None] - pos[:, k, u, None]).abs() <= BLOCK_HALF     # [B, W]
            rows = (centers[None] - pos[:, k, v, None]).abs() <= BLOCK_HALF     # [B, H]
            near = -pos[:, k, d]       # [B] a camera looks from the + side: larger = nearer
            inside = rows[:, :, None] & cols[:, None, :] & (near[:, None, None] < depth)
            depth = torch.where(inside, near[:, None, None], depth)             # [B, H, W]
            block_id[:, cam] = torch.where(inside, k, block_id[:, cam])
            rgb = palette[colors[:, k]]                                         # [B, 3]
            images[:, cam] = torch.where(inside[:, None], rgb[:, :, None, None], images[:, cam])
    return images, block_id


class ToyPolicy(nn.Module):
    """CogVLA plus, for training only, the grounding probe: a linear read-out of every vision
    token the LLM receives, trained with binary cross-entropy to say whether that token's patch
    shows the named block. Its loss reaches the vision tower and the word embeddings (through
    the FiLMs, which learn which colour the instruction names); it never reaches the decoder's
    layers, their routers or the action head: what the router keeps, it learns from the action
    loss alone."""

    def __init__(self, cfg: CogVLAConfig):
        super().__init__()
        self.vla = CogVLA(cfg)
        self.probe = nn.Linear(cfg.d_model, 1)

    def forward(self, batch: dict, prune: bool, ground: bool, decoder: bool = True):
        """-> (action L1 loss or None, grounding loss or None). decoder=False: the probe's loss
        alone, from the vision tokens (the decoder does not run)."""
        if not decoder:
            vla = self.vla
            vision = vla.embed(batch["images"], batch["text_ids"], batch["state"])
            vision = vision[:, vla.cfg.vision_start:vla.cfg.text_start]
            return None, self.grounding_loss(vision, batch["named_patches"])
        out = self.vla(batch["images"], batch["text_ids"], batch["state"], batch["actions"],
                       prune=prune)
        if not ground:
            return out.loss, None
        return out.loss, self.grounding_loss(out.vision_tokens, batch["named_patches"])

    def grounding_loss(self, vision_tokens, named_patches):
        """vision_tokens [B, V, D], named_patches [B, V] bool -> the probe's BCE."""
        logits = self.probe(vision_tokens.float())[..., 0]                       # [B, V]
        return F.binary_cross_entropy_with_logits(logits, named_patches.float())


# %% Evaluation ================================================================================

def autocast(device):
    """bf16 autocast on CUDA; plain float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def held_out(args) -> dict:
    """The held-out scenes: a seed of their own, never one of the training stream's."""
    return make_batch(args.eval_size, seed=10_000_019 + args.seed)


@torch.no_grad()
def evaluate(model: CogVLA, data: dict, prune: bool, device, batch_size: int = 64) -> dict:
    """Held-out metrics. Where the gripper ends: `nearest` (closer to the named block than to
    the other two; chance 1/3), `success` (within SUCCESS_TOLERANCE of its centre) and
    `success_015` (within STRICT_TOLERANCE). What LFP kept: per LFP layer, the share of the
    named block's patches kept, the other blocks' share, and chance (the layer's keep ratio)."""
    was_training = model.training
    model.eval()
    cfg = model.cfg
    n = data["state"].shape[0]
    l1, nearest, success, success_015 = 0.0, 0, 0, 0
    kept = {"named_patches": {}, "other_patches": {}}     # {which: {layer: [kept, total]}}
    # Aggregation tokens are not places in an image: "the named block's tokens" means nothing.
    patch_mode = cfg.n_agg_tokens == 0
    for start in range(0, n, batch_size):
        part = {k: v[start:start + batch_size].to(device) for k, v in data.items()}
        with autocast(device):
            out = model(part["images"], part["text_ids"], part["state"], part["actions"],
                        prune=prune)
        pred = out.actions.float()
        l1 += F.l1_loss(pred, part["actions"], reduction="sum").item() / pred[0].numel()
        final = part["state"] + pred[..., :3].sum(dim=1) * STEP_SCALE         # [b, 3]
        to_blocks = (final[:, None] - part["blocks"]).norm(dim=-1)             # [b, 3 blocks]
        to_goal = to_blocks.gather(1, part["target"][:, None])[:, 0]           # [b]
        nearest += int((to_blocks.argmin(dim=-1) == part["target"]).sum())
        success += int((to_goal < SUCCESS_TOLERANCE).sum())
        success_015 += int((to_goal < STRICT_TOLERANCE).sum())
        for record in out.lfp if patch_mode else []:
            is_kept = torch.zeros_like(record.keep_probs, dtype=torch.bool)
            is_kept = is_kept.scatter(1, record.kept_indices, True)          # [b, N]
            vision_kept = is_kept[:, cfg.vision_start:cfg.text_start]          # [b, V]
            for which, counts in kept.items():
                c = counts.setdefault(record.layer, [0, 0])
                c[0] += int((vision_kept & part[which]).sum())
                c[1] += int(part[which].sum())
    model.train(was_training)
    share = {which: {l: round(k / max(t, 1), 4) for l, (k, t) in counts.items()}
             if patch_mode else None for which, counts in kept.items()}
    chance = {l: round(int(cfg.n_vision * r) / cfg.n_vision, 4) for l, r in cfg.lfp_ratios.items()}
    return dict(l1=round(l1 / n, 4), nearest=round(nearest / n, 4), success=round(success / n, 4),
                success_015=round(success_015 / n, 4), kept_share=share["named_patches"],
                kept_share_other=share["other_patches"], chance=chance if prune else {})


@torch.no_grad()
def keep_groups(model: CogVLA, data: dict, device, samples) -> list[dict]:
    """What each LFP layer kept of some evaluation scenes, as report.py draws it: per scene its
    instruction, images [3, 3, H, W], the named block's patches [3, S, S] and, per LFP layer,
    the kept patches [3, S, S] and the kept shares of the named block and of the others."""
    part = {k: v[list(samples)].to(device) for k, v in data.items()}
    was_training = model.training
    model.eval()
    with autocast(device):
        out = model(part["images"], part["text_ids"], part["state"], prune=True)
    model.train(was_training)
    cfg, side = model.cfg, IMAGE_SIZE // PATCH
    groups = []
    for b in range(len(samples)):
        named, other = part["named_patches"][b].cpu(), part["other_patches"][b].cpu()     # [V]
        words = " ".join(VOCAB[i] for i in part["text_ids"][b, :4].tolist())  # the tiled instruction
        group = dict(label=f'"{words}"', images=part["images"][b].cpu().numpy(),
                     named=named.view(3, side, side).numpy(), kept={}, shares={})
        for record in out.lfp:
            kept = torch.zeros(cfg.seq_len, dtype=torch.bool)
            kept[record.kept_indices[b].cpu()] = True
            kept = kept[cfg.vision_start:cfg.text_start]                                   # [V]
            group["kept"][record.layer] = kept.view(3, side, side).numpy()
            group["shares"][record.layer] = tuple(float((kept & m).sum() / max(int(m.sum()), 1))
                                                  for m in (named, other))
        groups.append(group)
    return groups


def keep_maps(model: CogVLA, data: dict, device, sample: int = 0) -> str:
    """The terminal's keep maps of one evaluation scene: per LFP layer, per camera."""
    return report.keep_map_text(keep_groups(model, data, device, [sample])[0])


def draw_report(folder: str, history: dict, model: CogVLA, args, device) -> str:
    """The run's pictures (report.py) from `history` {mode: dict(loss, held_out, metrics)}; the
    keep maps, if an LFP model on patch tokens is in it, from `model`. Returns the page's path."""
    cfg, figures = model.cfg, {}
    lfp = history.get("lfp")
    if lfp and args.tokens == "patch":
        data = held_out(args)
        figures["keep_maps"] = report.keep_grid("What each LFP layer keeps: held-out scenes",
                                                keep_groups(model, data, device,
                                                            range(min(3, args.eval_size))))
        # One scene of its own (a seed no training batch has), each of its blocks named in turn.
        swapped = [make_batch(1, seed=20_000_003 + args.seed, named=[k]) for k in range(N_BLOCKS)]
        swapped = {k: torch.cat([s[k] for s in swapped]) for k in swapped[0]}
        figures["instruction_swapped"] = report.keep_grid(
            "One scene, the instruction naming each block in turn", keep_groups(model, swapped, device,
                                                                               range(N_BLOCKS)))
    figures["curves"] = report.curves({m: h for m, h in history.items()})
    cost = cogvla_mini.account(cfg, 1)
    tokens = {"dense": {c.layer: c.tokens for c in cost.dense}}
    flops = {"dense": {c.layer: c.flops for c in cost.dense}}
    kept = {}
    if lfp:
        tokens["lfp"] = {c.layer: c.tokens for c in cost.layers}
        flops["lfp"] = {c.layer: c.flops for c in cost.layers}
        m = lfp["metrics"]
        kept = {"named block": m["kept_share"], "other blocks": m["kept_share_other"],
                "chance": m["chance"]} if m.get("kept_share") else {}
    figures["per_layer"] = report.per_layer(cfg.seq_len, tokens, flops, kept)
    lines = [f"{args.layout} layout, seed {args.seed}, {args.steps} steps; " + "; ".join(
        f"{mode} at step {h['held_out'][-1][0]}: nearest {h['held_out'][-1][1]:.0%}, success "
        f"{h['held_out'][-1][2]:.0%}" for mode, h in history.items() if h["held_out"])]
    return report.write(folder, "CogVLA-mini toy run", figures, lines)


# %% Checkpoints: atomic, with everything a bit-exact resume needs =============================

def save_checkpoint(path: str, model, optimizer, step: int, args, cfg: CogVLAConfig, world: int):
    tmp = path + ".tmp"
    torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                    torch_rng=torch.get_rng_state(), args=vars(args), world=world,
                    config=asdict(cfg)), tmp)
    os.replace(tmp, path)   # atomic: a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(path: str, model, optimizer, args, world: int) -> int:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "world" not in ckpt:
        raise SystemExit(f"--resume: {path} was made by an older train_toy.py (no process count, "
                         f"no grounding probe); start a new run")
    for key in ("seed", "steps", "batch_size", "lr", "dense", "tokens", "no_film", "ground_weight",
                "ground_steps", "prune_warmup", "layout"):
        if ckpt["args"].get(key) != getattr(args, key):
            raise SystemExit(f"--resume: the checkpoint was made with --{key.replace('_', '-')}="
                             f"{ckpt['args'].get(key)!r}, this run has {getattr(args, key)!r}; resume "
                             f"with the same flags")
    if ckpt["world"] != world:   # rank r of w reads batches r, r + w, ...: another w, another stream
        raise SystemExit(f"--resume: the checkpoint was made by {ckpt['world']} process(es), this "
                         f"run has {world}; resume with the same number (the data stream depends "
                         f"on it)")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["step"]


def finite_weights(model) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def last_checkpoint(path) -> str:
    """The end of a stop message: where the last good checkpoint is, if there is one."""
    if path and os.path.exists(path):
        return f"; the last good checkpoint is {path}"
    return "; no checkpoint was saved"


# %% Training ==================================================================================

def say(*parts):
    print(*parts, flush=True)   # progress shows up at once even when the output goes to a file


def learning_rate(step: int, args) -> float:
    """A short linear warm-up, flat at the peak for 60% of the run, then a cosine to 10%: the
    model first learns which block the words name and only then where it is, and the second
    phase needs the full rate."""
    warmup = max(1, args.steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = max(0.0, (step - warmup) / max(1, args.steps - warmup) - 0.6) / 0.4
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def sigint_at_step_boundary():
    """The first Ctrl-C sets a flag instead of raising wherever Python happens to be (inside
    optimizer.step(), say, which would save a half-updated optimizer); the training loop reads
    the flag once per step, saves, and stops there. A second Ctrl-C interrupts at once, for a
    step that never ends. Yields the flag, a threading.Event."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():   # signals reach it alone
        yield asked
        return

    def first_ctrl_c(signum, frame):
        asked.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, first_ctrl_c)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)


def losses(net, batch: dict, dense: bool, args, device, world: int, step: int):
    """One forward pass -> (loss, action loss, grounding loss or None, error or None, fatal).
    The first --ground-steps steps train the probe alone (no action loss: the decoder waits).
    An inf/NaN (a non-finite loss, or an LFP layer's FloatingPointError) is an error to stop
    at; any other exception, under DDP, is returned (fatal) so that every rank stops together,
    and alone is raised."""
    ground, decoder = args.ground_weight > 0, step >= args.ground_steps
    try:
        with autocast(device):
            action_loss, ground_loss = net(batch, prune=not dense, ground=ground, decoder=decoder)
        loss = (args.ground_weight * ground_loss if not decoder else
                action_loss + args.ground_weight * ground_loss if ground else action_loss)
        error = None if torch.isfinite(loss) else f"non-finite loss {loss.item()}"
        return loss, action_loss, ground_loss, error, False
    except FloatingPointError as err:
        return None, None, None, str(err), False
    except Exception as err:
        if world == 1:
            raise
        return None, None, None, f"{type(err).__name__}: {err}", True


def stop_if_failed_or_interrupted(run: dict, step: int, error, fatal: bool, interrupted: bool):
    """Every rank learns whether any rank failed or was interrupted, so that all stop at the
    same step (a rank that stopped alone would leave the others waiting in the gradient
    all-reduce). A failure raises, naming the step and every failed rank; an interruption
    saves the weights of `step` steps (never non-finite ones) and raises KeyboardInterrupt."""
    mode, world, path = run["mode"], run["world"], run["ckpt_path"]
    failed = error is not None
    if world > 1:
        flags = torch.tensor([float(failed), float(interrupted)], device=run["device"])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed, interrupted = bool(flags[0]), bool(flags[1])
    if failed:
        errors = [error]
        if world > 1:
            errors = [None] * world
            dist.all_gather_object(errors, error)
            errors = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
            # gloo's worker thread frees the gather's tensors just after the call returns and
            # needs the GIL to do so; destroying the process group first (the raise below frees
            # the DDP model, GIL held) would wait for that thread forever. Sleeping releases
            # the GIL and lets the thread finish.
            time.sleep(0.1)
        stop = RuntimeError if fatal else FloatingPointError
        raise stop(f"[{mode}] stopping at step {step}: {'; '.join(errors)}{last_checkpoint(path)}")
    if not interrupted:
        return
    if run["rank"] == 0 and path:
        if not finite_weights(run["policy"]):
            raise FloatingPointError(f"[{mode}] interrupted at step {step} with non-finite "
                                     f"weights: nothing saved{last_checkpoint(path)}")
        save_checkpoint(path, run["policy"], run["optimizer"], step, run["args"], run["cfg"], world)
        again = "the same flags + --resume" + (" (with --dense for dense.pt)" * (mode == "dense"))
        run["log"](f"[{mode}] interrupted at step {step}; saved {path}; continue with {again}"
                   + (" (--compare cannot resume: resume each mode alone)" * run["args"].compare))
    elif run["rank"] == 0:
        run["log"](f"[{mode}] interrupted at step {step}; nothing saved (no --out)")
    raise KeyboardInterrupt


@contextlib.contextmanager
def every_token_kept(model: CogVLA, warming_up: bool):
    """During --prune-warmup every LFP layer keeps all its tokens: its router still weights each
    token's MLP output, so it learns which tokens matter before it has to drop any."""
    layers = [l for l in model.llm.layers if isinstance(l, cogvla_mini.LFPDecoderLayer)]
    kept = [l.n_keep for l in layers]
    for layer in layers if warming_up else []:
        layer.n_keep = model.cfg.seq_len
    try:
        yield
    finally:
        for layer, n in zip(layers, kept):
            layer.n_keep = n


def save_if_finite(run: dict, step: int):
    """A finite loss can still give non-finite gradients and then weights: never save those over
    the last good checkpoint. Every rank checks its (identical) copy, so all stop together."""
    if not finite_weights(run["policy"]):
        raise FloatingPointError(f"[{run['mode']}] stopping at step {step}: non-finite weights "
                                 f"after the optimizer step{last_checkpoint(run['ckpt_path'])}")
    if run["rank"] == 0:
        save_checkpoint(run["ckpt_path"], run["policy"], run["optimizer"], step, run["args"],
                        run["cfg"], run["world"])


def phase(step: int, args) -> int:
    """0 while the probe trains alone, 1 in the warm-up that keeps every token, 2 after."""
    return 0 if step <= args.ground_steps else 1 if step <= args.prune_warmup else 2


def progress(run: dict, step: int, action_loss, ground_loss):
    """The progress line of a logging step; at a learning-curve step also the held-out
    evaluation and the report redrawn (a browser tab refreshed mid-run shows the run so far).
    The rate is that of the recent steps of the current phase: a probe-only step costs a
    fraction of a decoder step, so an average since the start misleads."""
    args, mode, curves = run["args"], run["mode"], run["history"][run["mode"]]
    line = f"loss {action_loss.item():.4f}" if action_loss is not None else "loss -"
    if action_loss is not None:
        curves["loss"].append((step, action_loss.item()))
    if ground_loss is not None:
        line += f"  grounding {ground_loss.item():.4f}"
    if step % args.eval_every == 0 or step == args.steps:  # a multiple of log_every
        m = evaluate(run["policy"].vla, run["curve_data"], prune=mode == "lfp", device=run["device"])
        curves["held_out"].append((step, m["nearest"], m["success"]))
        curves["metrics"] = m
        line += (f"  | held-out {len(run['curve_data']['state'])}: nearest {m['nearest']:.0%}"
                 f"  success {m['success']:.0%}")
        redraw(run)
    marks, now = run["marks"], time.time()
    if marks[-1][2] != phase(step, args):
        del marks[:-1]                          # the last mark of the phase before: this one's start
    marks.append((step, now, phase(step, args)))
    del marks[:-5]
    rate = (marks[-1][0] - marks[0][0]) / max(marks[-1][1] - marks[0][1], 1e-9)
    eta = (f"ETA once the decoder trains (step {args.ground_steps})" if step < args.ground_steps
           else f"ETA {(args.steps - step) / rate:.0f} s")
    run["log"](f"[{mode}] step {step:>5}/{args.steps}  {line}  {rate:.2f} steps/s  {eta}")


def redraw(run: dict):
    """Write the run's report (--no-maps: none), timing the drawing."""
    if not run["args"].maps:
        return
    start = time.time()
    folder = run["args"].out or os.path.join("runs", "latest")
    run["report"] = draw_report(folder, run["history"], run["policy"].vla, run["args"], run["device"])
    run["drawing"] += time.time() - start


def train(args, dense: bool, film: bool, rank: int = 0, world: int = 1, log=say, study=None,
          history=None) -> dict:
    """Train one model; returns the final metrics (on rank 0). `study(model, eval_data, metrics,
    device, log)`, if given, studies the trained LFP model (where_read.py's); its result is
    added to the metrics as "where_read". `history` {mode: curves}: the runs the report draws."""
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(args.device if world == 1 or args.device == "cpu"
                          else f"cuda:{local_rank}")
    torch.manual_seed(args.seed)                           # identical initial weights on every rank
    cfg = toy_config(args.tokens, film, args.layout)
    policy = ToyPolicy(cfg).to(device)
    model = policy.vla
    # beta2 0.95, as Llama was trained, not PyTorch's 0.999: the gradients' scale changes within
    # a hundred steps (the probe's loss falls ten-fold), which a second moment averaged over
    # ~1000 steps follows too slowly.
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.01)
    mode = "dense" if dense else "lfp"
    ckpt_path = os.path.join(args.out, f"{mode}.pt") if args.out else None
    run = dict(mode=mode, rank=rank, world=world, device=device, ckpt_path=ckpt_path, args=args,
               cfg=cfg, policy=policy, optimizer=optimizer, log=log, drawing=0.0,
               history=history if history is not None else {}, report=None)
    run["history"][mode] = dict(loss=[], held_out=[], metrics={})
    step = 0
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path} (give the --out DIR of the "
                             f"first run)")
        step = load_checkpoint(ckpt_path, policy, optimizer, args, world)
        log(f"[{mode}] resumed from {ckpt_path} at step {step}")
    net = policy
    if world > 1:   # dense runs no router, a run without the probe's loss no probe, a grounding
        # step no decoder: DDP must know
        unused = dense or not args.ground_weight or args.ground_steps > 0
        net = DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda"
                                      else None, find_unused_parameters=unused)
    eval_data = held_out(args)
    run["curve_data"] = {k: v[:args.curve_size] for k, v in eval_data.items()}   # curve subset
    start_time = time.time()
    run["marks"] = [(step, start_time, phase(step, args))]
    probe = (f"grounding probe weight {args.ground_weight:g}" if args.ground_weight else
             "grounding probe off") + (f" (alone for the first {args.ground_steps} steps)"
                                       if args.ground_steps else "")
    warmup = (f", every token kept for the first {args.prune_warmup} steps" if args.prune_warmup
              else "")
    log(f"[{mode}] {sum(p.numel() for p in model.parameters()):,} parameters, {args.tokens} "
        f"tokens, {args.layout} layout, router FiLM {'on' if film else 'off'}, {probe}{warmup}, "
        f"{world} process(es) x batch {args.batch_size}, {args.steps} steps")
    with sigint_at_step_boundary() as interrupt:
        while step < args.steps:
            # Each (step, rank) has its own batch: rank r of w sees its own shard of the stream.
            batch = make_batch(args.batch_size, seed=args.seed * 1_000_003 + step * world + rank)
            batch = {k: v.to(device) for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            with every_token_kept(model, step < args.prune_warmup):
                loss, action_loss, ground_loss, error, fatal = losses(net, batch, dense, args,
                                                                      device, world, step)
            stop_if_failed_or_interrupted(run, step, error, fatal, interrupt.is_set())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            step += 1
            if rank == 0 and (step % args.log_every == 0 or step == args.steps):
                progress(run, step, action_loss, ground_loss)
            if ckpt_path and (step % args.save_every == 0 or step == args.steps):
                save_if_finite(run, step)
    seconds = time.time() - start_time
    if rank != 0:
        return {}
    metrics = evaluate(model, eval_data, prune=not dense, device=device)
    if args.tokens == "patch" and not dense and args.maps:
        log(keep_maps(model, eval_data, device))
    run["history"][mode]["metrics"] = metrics
    redraw(run)
    if study and not dense:
        metrics["where_read"] = study(model, eval_data, metrics, device, log)
    cost = cogvla_mini.account(cfg, args.batch_size)   # what pruning saves, bounded by FLOPs
    tokens, bound = (1.0, 1.0) if dense else (round(cost.token_share, 4), round(cost.speedup_bound, 3))
    return dict(mode=mode, tokens=args.tokens, film=film, ground_weight=args.ground_weight,
                steps=step, seconds=round(seconds, 1), tokens_processed=tokens, flop_bound=bound,
                report=run["report"], drawing_seconds=round(run["drawing"], 2), **metrics)


# %% Main ======================================================================================

def print_table(runs: list[dict], log=say):
    log(f"\n{'':<24}" + "".join(f"{r['mode'] + ('' if r['film'] else ' no-film'):>14}" for r in runs))
    log(f"{'action L1':<24}" + "".join(f"{r['l1']:>14.4f}" for r in runs))
    log(f"{'nearest the named block':<24}" + "".join(f"{r['nearest']:>14.1%}" for r in runs))
    log(f"{'success (within 0.25)':<24}" + "".join(f"{r['success']:>14.1%}" for r in runs))
    log(f"{'within 0.15':<24}" + "".join(f"{r['success_015']:>14.1%}" for r in runs))
    log(f"{'train seconds':<24}" + "".join(f"{r['seconds']:>14.1f}" for r in runs))
    log(f"{'tokens processed':<24}" + "".join(f"{r['tokens_processed']:>14.1%}" for r in runs))
    log(f"{'FLOP-bound speedup':<24}" + "".join(f"{r['flop_bound']:>13.3f}x" for r in runs))
    for layer in sorted({l for r in runs for l in (r["chance"] or {})}):
        cells = []   # the named block's patches kept, the other blocks', and chance
        for r in runs:
            named = (r["kept_share"] or {}).get(layer)
            other = (r["kept_share_other"] or {}).get(layer)
            cells.append(f"{named:.0%}/{other:.0%}/{r['chance'][layer]:.0%}"
                         if named is not None else "-")
        log(f"{'layer ' + str(layer) + ' named/other/chance':<24}" + "".join(f"{c:>14}" for c in cells))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps, --ground-steps "
                   "included (default: 800 with --layout source, 700 every, 1000 route)")
    p.add_argument("--batch-size", type=int, default=16, help="scenes per step, per process")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate (warm-up, flat to 60%% of the steps, then cosine to 10%%)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the data stream")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda trains under bf16 autocast)")
    p.add_argument("--tokens", choices=["patch", "agg"], default="patch",
                   help="vision tokens: image patches (keep maps mean something) or CogVLA's "
                        "aggregation tokens")
    p.add_argument("--dense", action="store_true", help="train with pruning off")
    p.add_argument("--compare", action="store_true",
                   help="train dense and LFP from the same seed, side by side")
    p.add_argument("--no-film", action="store_true", help="turn the LFP router's FiLM off (the ablation)")
    p.add_argument("--ground-weight", type=float, default=None,
                   help="weight of the grounding probe's loss (default 1 with patch tokens, 0 = off; "
                        "agg tokens have no patches to label, so it must stay 0 there)")
    p.add_argument("--ground-steps", type=int, default=None, help="the first steps train the "
                   "grounding probe alone, the decoder waiting (cheap: the vision tower only; "
                   "default 100 with the probe on, 0 = off)")
    p.add_argument("--prune-warmup", type=int, default=300, help="the first steps in which every "
                   "LFP layer keeps all its tokens, its router still weighting their MLPs (0 = off)")
    p.add_argument("--layout", choices=list(LAYOUTS), default="source", help="the LFP layers: "
                   "'source' (layers 1-6, between standard ones), 'every' (all 8 prune) or "
                   "'route' (all 8 keep a quarter: no way around the routers)")
    p.add_argument("--eval-size", type=int, default=512, help="held-out scenes (fixed seed)")
    p.add_argument("--curve-size", type=int, default=128,
                   help="held-out scenes of the learning-curve lines")
    p.add_argument("--eval-every", type=int, default=50, help="steps between learning-curve lines")
    p.add_argument("--out", default=None, help="directory for checkpoints (saved atomically)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=25, help="steps between progress lines")
    p.add_argument("--no-maps", dest="maps", action="store_false",
                   help="no pictures: neither the report (report.html and .svg files in --out, "
                        "else runs/latest) nor the terminal's keep maps")
    args = p.parse_args(argv)
    if args.resume and not args.out:
        p.error("--resume needs --out DIR, the directory of the run to continue")
    if args.compare and (args.dense or args.resume):
        p.error("--compare trains both modes itself: leave out --dense and --resume")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available")
    if args.steps is None:
        args.steps = STEPS[args.layout]
    # Each flag's own range first, so that a bad value is named by its own flag.
    for name in ("steps", "batch_size", "eval_size", "curve_size", "eval_every", "save_every",
                 "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("ground_steps", "prune_warmup"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.ground_weight is not None and not (math.isfinite(args.ground_weight)
                                               and args.ground_weight >= 0):
        p.error(f"--ground-weight must be a finite number >= 0, got {args.ground_weight}")
    if args.ground_weight is None:
        args.ground_weight = 1.0 if args.tokens == "patch" else 0.0
    if args.ground_weight > 0 and args.tokens == "agg":
        p.error(f"--ground-weight must be 0 with --tokens agg (no patches to label), "
                f"got {args.ground_weight:g}")
    given = args.ground_steps is not None
    if not given:
        args.ground_steps = 100 if args.ground_weight > 0 else 0
    if args.ground_steps and not (args.ground_weight > 0 and args.ground_steps < args.steps):
        p.error(f"--ground-steps trains the grounding probe alone: it needs --ground-weight > 0 "
                f"and fewer steps than --steps ({args.steps}), got {args.ground_steps}"
                f"{'' if given else ' (its default; pass --ground-steps 0 or more --steps)'}")
    if args.eval_every % args.log_every:   # a learning-curve line is a progress line with more
        p.error(f"--eval-every must be a multiple of --log-every ({args.log_every}), "
                f"got {args.eval_every}")
    return args


def main(argv=None, log=say, study=None) -> dict:
    """Parse the flags, train (both modes with --compare), print the table and the JSON line.
    `study`: see train()."""
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:   # started by torchrun
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if rank != 0:
        log = lambda *a, **k: None                     # noqa: E731  rank 0 alone prints
    if args.out and rank == 0:
        os.makedirs(args.out, exist_ok=True)
    try:
        modes = [True, False] if args.compare else [args.dense]
        history = {}
        runs = [train(args, dense=d, film=not args.no_film, rank=rank, world=world, log=log,
                      study=study, history=history) for d in modes]
        if world > 1:
            dist.barrier()   # rank 0 evaluates alone; the others wait for it here
    finally:
        # No barrier on the error path: there the ranks have already agreed to stop.
        if world > 1:
            dist.destroy_process_group()
    if rank != 0:
        return {}
    print_table(runs, log)
    if args.maps:
        log(f"\nthe run's pictures: {runs[-1]['report']} (open it in a browser; the figures "
            f"alone as .svg beside it)")
    result = runs[0] if len(runs) == 1 else dict(mode="compare", runs=runs)
    log(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as err:
        sys.exit(str(err))
    except KeyboardInterrupt:
        sys.exit(130)   # the checkpoint (with --out) is saved and the message printed
