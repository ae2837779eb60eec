"""Executable claims about train_toy.py: the task, evaluation, checkpoints, faults and DDP."""

import base64
import dataclasses
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

import pytest
import torch

import cogvla_mini as cm
import report
import train_toy
from cogvla_mini import CogVLA
from conftest import randomize_films


# ----------------------------------------------------------------------------- the toy trainer

TOY_ARGS = ["--batch-size", "4", "--eval-size", "4", "--log-every", "1", "--ground-steps", "0", "--prune-warmup", "0"]
# Runs whose claims do not depend on the batch (a stop, a resume, a refusal) use batches of 2: ~15% faster.
SMALL_ARGS = ["--batch-size", "2", "--eval-size", "2", "--log-every", "1", "--ground-steps", "0", "--prune-warmup", "0"]


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


def test_toy_each_camera_sees_its_own_table_shade_no_brighter_than_any_block():
    batch = train_toy.make_batch(8, seed=6)
    palette = torch.tensor(list(train_toy.COLORS.values()))                       # [4 colours, rgb]
    for cam, shade in enumerate(train_toy.TABLE_SHADES):
        table = (batch["images"][:, cam] == shade).all(dim=1)                      # [B, H, W] table pixels
        assert table.float().mean() > 0.5, f"camera {cam}: expected most pixels to be its table, shade {shade}"
        assert (palette >= shade).all(), f"camera {cam}: a block colour darker than the table in some channel"
    assert len(set(train_toy.TABLE_SHADES)) == 3, "each camera its own shade, so a token tells its camera"


def test_toy_named_and_other_block_patches_are_disjoint_and_cover_every_block():
    batch = train_toy.make_batch(16, seed=4)
    named, other = batch["named_patches"], batch["other_patches"]
    assert not (named & other).any()
    assert named.any(dim=1).all() and other.any(dim=1).all()   # 3 blocks: the named one and others show
    table = torch.tensor(train_toy.TABLE_SHADES)[None, :, None, None, None]      # each camera's own shade
    lit = (batch["images"] - table).abs().sum(dim=2, keepdim=True).gt(1e-6).float().flatten(0, 1)  # block pixels
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


def test_toy_grounding_loss_reaches_the_vision_tower_and_never_the_decoder():
    torch.manual_seed(0)
    policy = train_toy.ToyPolicy(train_toy.toy_config())
    randomize_films(policy.vla, router=False)          # so the instruction reaches the vision tokens
    _, ground = policy(train_toy.make_batch(2, seed=3), prune=True, ground=True)
    ground.backward()
    grads = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in policy.named_parameters()}
    reached = {n for n, g in grads.items() if g}
    assert "probe.weight" in reached and "vla.llm.embed_tokens.weight" in reached   # the instruction's words
    # (the fusion MLP's first layer gets none yet: its output layer starts at zero)
    assert {n for n in grads if n.startswith("vla.vision.") and ".fusion.0." not in n} <= reached
    assert not {n for n in reached if n.startswith(("vla.llm.layers.", "vla.llm.norm", "vla.action", "vla.state"))}


def test_toy_layout_every_prunes_at_every_layer_from_the_first():
    every = train_toy.toy_config(layout="every").lfp_ratios
    assert list(every) == list(range(8)), "--layout every: no standard layer for the action to read around the routers"
    assert list(train_toy.toy_config().lfp_ratios) == [1, 2, 3, 4, 5, 6]
    route = train_toy.toy_config(layout="route").lfp_ratios
    assert list(route) == list(range(8)) and max(route.values()) <= 0.25, "--layout route: a layer keeps more than a quarter"
    assert list(train_toy.toy_config().lfp_ratios.values()) == list(cm.SOURCE_SCHEDULE.values())


def test_toy_steps_default_to_each_layouts_own_count_and_the_help_says_which(capsys):
    for layout, steps in train_toy.STEPS.items():
        assert train_toy.parse_args(["--layout", layout]).steps == steps, f"--layout {layout}: not its own steps"
        assert train_toy.parse_args(["--layout", layout, "--steps", "500"]).steps == 500, "an explicit --steps is overridden"
    with pytest.raises(SystemExit):
        train_toy.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    said = dict((layout, int(n)) for n, layout in re.findall(r"(\d+) (?:with --layout )?(source|every|route)", help_text))
    assert said == train_toy.STEPS, f"--help gives the default steps as {said}, the trainer uses {train_toy.STEPS}"


def test_toy_grounding_steps_leave_the_decoder_waiting_and_the_prune_warmup_keeps_every_token(monkeypatch):
    """--ground-steps 2 --prune-warmup 4, 6 steps: at steps 0-1 only the probe trains (the decoder
    does not run and its weights stay as they were); at steps 2-3 every LFP layer keeps all 256
    tokens; from step 4 on each keeps the source's count."""
    kept, weights, real_forward, real_step = [], [], cm.CogVLA.forward, torch.optim.AdamW.step

    def forward(self, *a, **kw):          # the kept counts of each training forward
        out = real_forward(self, *a, **kw)
        if self.training:
            kept.append([r.kept_indices.shape[1] for r in out.lfp])
        return out

    def step(self, *a, **kw):             # a decoder weight and a vision weight after each step
        out = real_step(self, *a, **kw)
        named = dict(zip(names, self.param_groups[0]["params"]))
        weights.append((named["vla.llm.layers.3.mlp.up_proj.weight"].clone(),
                        named["vla.vision.dino.patch_embed.weight"].clone()))
        return out
    names = [n for n, _ in train_toy.ToyPolicy(train_toy.toy_config()).named_parameters()]
    torch.manual_seed(0)
    init = dict(train_toy.ToyPolicy(train_toy.toy_config()).named_parameters())
    monkeypatch.setattr(cm.CogVLA, "forward", forward)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train_toy.main(SMALL_ARGS + ["--steps", "6", "--ground-steps", "2", "--prune-warmup", "4", "--no-maps",
                                 "--eval-every", "6"], log=lambda *_: None)
    source = [cm.n_kept_tokens(train_toy.toy_config(), r) for r in cm.SOURCE_SCHEDULE.values()]
    assert kept == [[256] * 6, [256] * 6, source, source], kept        # steps 2, 3 (warm-up), 4, 5
    decoder, vision = zip(*weights)
    start = init["vla.llm.layers.3.mlp.up_proj.weight"].detach()
    assert torch.equal(decoder[0], start) and torch.equal(decoder[1], start), "the decoder trained in a grounding step"
    assert not torch.equal(decoder[2], start), "the decoder did not train after the grounding steps"
    assert not torch.equal(vision[0], init["vla.vision.dino.patch_embed.weight"].detach()), "the probe did not train"


@pytest.mark.parametrize("flags, steps", [([], 100), (["--ground-weight", "0"], 0), (["--tokens", "agg"], 0),
                                          (["--ground-steps", "7"], 7)])
def test_toy_probe_only_steps_follow_the_probe_unless_given(flags, steps):
    """Turning the probe off (or agg tokens, which have no probe) needs no second flag."""
    assert train_toy.parse_args(flags).ground_steps == steps


@pytest.mark.parametrize("flag, value", [("--steps", "-5"), ("--steps", "0"), ("--batch-size", "0"), ("--lr", "nan"),
                                         ("--lr", "inf"), ("--lr", "-1"), ("--ground-weight", "nan"),
                                         ("--ground-weight", "-1"), ("--ground-steps", "-1"), ("--prune-warmup", "-3"),
                                         ("--eval-size", "0"), ("--curve-size", "0"), ("--eval-every", "0"),
                                         ("--save-every", "0"), ("--log-every", "0")])
def test_toy_each_bad_flag_value_is_refused_in_one_sentence_naming_that_flag(flag, value, capsys):
    with pytest.raises(SystemExit):
        train_toy.parse_args([flag, value])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f": error: {flag} must be" in message, message
    assert value in message, f"the message does not say what came: {message}"


def test_toy_probe_only_steps_without_a_probe_or_beyond_the_run_are_refused(capsys):
    with pytest.raises(SystemExit):
        train_toy.parse_args(["--ground-weight", "0", "--ground-steps", "5"])
    assert "--ground-steps trains the grounding probe alone: it needs --ground-weight > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_toy.parse_args(["--steps", "50"])   # shorter than the default probe-only start
    assert "got 100 (its default; pass --ground-steps 0 or more --steps)" in capsys.readouterr().err


def test_toy_grounding_probe_alone_teaches_the_vision_tower_to_mark_the_named_block():
    """The probe's loss alone (100 steps of 8 scenes, lr 1e-2, only the vision path run: the
    probe's gradient reaches nothing else, as the test above shows). On 64 held-out scenes the
    named block's patches then score above the other blocks' in >= 90% of scenes, from 41% at
    init (model seeds 0-3 measured: 100, 100, 100 and 98% at step 100; 80, 53, 77, 67% at 50)."""
    torch.manual_seed(0)
    policy = train_toy.ToyPolicy(train_toy.toy_config())
    vla, cfg = policy.vla, policy.vla.cfg

    def vision_tokens(batch):                                           # what the LLM would receive
        return vla.embed(batch["images"], batch["text_ids"], batch["state"])[:, cfg.vision_start:cfg.text_start]

    def named_block_wins(batch):
        with torch.no_grad():
            score = policy.probe(vision_tokens(batch))[..., 0]                              # [B, V]
        named = (score * batch["named_patches"]).sum(1) / batch["named_patches"].sum(1)
        other = (score * batch["other_patches"]).sum(1) / batch["other_patches"].sum(1).clamp_min(1)
        return (named > other).float().mean().item()

    held_out = train_toy.make_batch(64, seed=10**6)
    before = named_block_wins(held_out)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for step in range(100):
        batch = train_toy.make_batch(8, seed=step)
        loss = policy.grounding_loss(vision_tokens(batch), batch["named_patches"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = named_block_wins(held_out)
    assert before < 0.6 and after >= 0.9, \
        f"named block's patches above the others' in {before:.0%} of held-out scenes at init, {after:.0%} after 100 steps"


def test_toy_keep_maps_mark_the_named_blocks_patches():
    model = CogVLA(train_toy.toy_config())
    data = train_toy.make_batch(2, seed=9)
    text = train_toy.keep_maps(model, data, "cpu", sample=0)
    rows = [line for line in text.splitlines() if line.startswith(("layer", " " * 8)) and ("#" in line or "." in line)]
    assert len(rows) == 6 * 8                                  # 6 LFP layers x 8 patch rows
    brackets = sum(line.count("[") for line in rows)
    assert brackets == 6 * int(data["named_patches"][0].sum())  # the named block's patches, at every layer


def checkpoint_weights(path):
    # A file this test run wrote itself: the full unpickler is safe here, and twice as fast as
    # weights_only (~0.1 s a load), which train_toy's --resume keeps.
    return torch.load(path, map_location="cpu", weights_only=False)


def sigint_during(monkeypatch, where):
    """Send a real Ctrl-C (SIGINT) to this process once, at step 2, from inside `where`."""
    state = {"sent": False}

    def fire():
        if not state["sent"]:
            state["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)

    if where == "make_batch":                    # while step 2's batch is made (seed 0: step k has seed k)
        real = train_toy.make_batch
        monkeypatch.setattr(train_toy, "make_batch",
                            lambda n, seed, **kw: (fire() if seed == 2 else None) or real(n, seed, **kw))
    else:                                        # inside the forward pass, or inside optimizer.step()
        target = train_toy.ToyPolicy if where == "forward" else torch.optim.AdamW
        name = "forward" if where == "forward" else "step"
        real, calls = getattr(target, name), []

        def wrapped(self, *a, **kw):
            calls.append(1)
            if len(calls) == 3:                  # the third call: step 2
                fire()
            return real(self, *a, **kw)

        monkeypatch.setattr(target, name, wrapped)


CTRL_C_ARGS = ["--steps", "4", "--save-every", "2", "--no-maps"] + SMALL_ARGS


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The checkpoint of a 4-step run that nobody interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train_toy.main(CTRL_C_ARGS + ["--out", str(out)], log=lambda *_: None)
    return checkpoint_weights(out / "lfp.pt")


@pytest.mark.parametrize("where", ["make_batch", "forward", "optimizer_step"])
def test_toy_resume_after_ctrl_c_anywhere_ends_with_the_same_weights(tmp_path, monkeypatch, where, uninterrupted):
    args = CTRL_C_ARGS
    with monkeypatch.context() as patch:
        sigint_during(patch, where)
        with pytest.raises(KeyboardInterrupt):
            train_toy.main(args + ["--out", str(tmp_path / "b")], log=lambda *_: None)
    # Ctrl-C inside step 2's optimizer step lets that step finish: 3 steps are done, and saved as 3.
    assert checkpoint_weights(tmp_path / "b" / "lfp.pt")["step"] == (3 if where == "optimizer_step" else 2)
    train_toy.main(args + ["--out", str(tmp_path / "b"), "--resume"], log=lambda *_: None)

    a, b = uninterrupted, checkpoint_weights(tmp_path / "b" / "lfp.pt")
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"])
    assert not os.path.exists(tmp_path / "b" / "lfp.pt.tmp")


def poison_weights_after_step(monkeypatch, n, which=0):
    """The model diverges: after the n-th optimizer step parameter number `which` is NaN (the
    first is CogVLA's state_embed, which every forward reads)."""
    real, calls = torch.optim.AdamW.step, []

    def step(self, *a, **kw):
        out = real(self, *a, **kw)
        calls.append(1)
        if len(calls) == n:
            self.param_groups[0]["params"][which].data.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("dense, poisoned, cause", [
    (True, 3, "stopping at step 3: non-finite loss nan"),                   # found by the next step's loss
    (False, 3, "stopping at step 3: LFP layer 1: inf or NaN"),              # or by the first LFP layer
    (False, 4, "stopping at step 4: non-finite weights"),                   # at a checkpoint: not saved
], ids=["dense-loss", "lfp-layer", "checkpoint"])
def test_toy_non_finite_values_stop_naming_the_step_and_keep_the_last_good_checkpoint(
        tmp_path, monkeypatch, dense, poisoned, cause):
    # From the poisoned step on, the state tokens are NaN, and so is every action query that reads them.
    poison_weights_after_step(monkeypatch, poisoned)
    with pytest.raises(FloatingPointError, match=f"{cause}.*the last good checkpoint is"):
        train_toy.main(["--steps", "6", "--save-every", "2", "--no-maps", "--out", str(tmp_path)] + SMALL_ARGS
                       + (["--dense"] if dense else []), log=lambda *_: None)
    kept = checkpoint_weights(tmp_path / ("dense.pt" if dense else "lfp.pt"))
    assert kept["step"] == 2
    assert all(torch.isfinite(w).all() for w in kept["model"].values()), "the checkpoint kept holds non-finite weights"


def test_toy_ctrl_c_never_saves_non_finite_weights(tmp_path, monkeypatch):
    """A dense run never runs its routers: NaN in one leaves the loss finite. Ctrl-C then finds
    the weights non-finite at the save it would make, and saves nothing."""
    names = [n for n, _ in train_toy.ToyPolicy(train_toy.toy_config()).named_parameters()]
    poison_weights_after_step(monkeypatch, 2, which=next(i for i, n in enumerate(names) if ".router." in n))
    sigint_during(monkeypatch, "make_batch")
    try:
        with pytest.raises(FloatingPointError, match="interrupted at step 2 with non-finite weights: nothing saved"):
            train_toy.main(["--steps", "4", "--save-every", "3", "--dense", "--no-maps", "--out", str(tmp_path)]
                           + SMALL_ARGS, log=lambda *_: None)
    except KeyboardInterrupt:   # what a plain Ctrl-C ends with: the run was saved
        pytest.fail("Ctrl-C saved non-finite weights as a checkpoint")
    assert not (tmp_path / "dense.pt").exists()


def test_toy_resume_refuses_other_flags_and_another_process_count(tmp_path, capsys):
    train_toy.main(["--steps", "1", "--no-maps", "--out", str(tmp_path)] + SMALL_ARGS, log=lambda *_: None)
    with pytest.raises(SystemExit, match="--seed=0, this run has 1"):
        train_toy.main(["--steps", "1", "--seed", "1", "--out", str(tmp_path), "--resume"] + SMALL_ARGS,
                       log=lambda *_: None)
    policy, args = train_toy.ToyPolicy(train_toy.toy_config()), train_toy.parse_args(["--steps", "1"] + SMALL_ARGS)
    optimizer = torch.optim.AdamW(policy.parameters())
    with pytest.raises(SystemExit, match="made by 1 process\\(es\\), this run has 2"):
        train_toy.load_checkpoint(str(tmp_path / "lfp.pt"), policy, optimizer, args, world=2)
    with pytest.raises(SystemExit):
        train_toy.parse_args(["--resume"])
    assert "--resume needs --out DIR" in capsys.readouterr().err


class FixedActions(torch.nn.Module):
    """Stands in for the model in `evaluate`: returns the given action chunks, whatever the input."""

    def __init__(self, cfg, actions):
        super().__init__()
        self.cfg, self.chunks = cfg, actions

    def forward(self, images, text_ids, state, actions=None, prune=True):
        return cm.CogVLAOutput(self.chunks.clone(), None, [])


def test_toy_evaluation_scores_where_the_gripper_ends():
    data = train_toy.make_batch(16, seed=21)
    cfg = train_toy.toy_config()
    exact = train_toy.evaluate(FixedActions(cfg, data["actions"]), data, prune=False, device="cpu")
    assert (exact["l1"], exact["nearest"], exact["success"], exact["success_015"]) == (0, 1, 1, 1)
    # Aim at the next block instead: never nearest the named one, never within 0.25 of it.
    other = data["blocks"][torch.arange(16), (data["target"] + 1) % 3]                  # [B, 3]
    steps = ((other - data["state"]) / 10 / train_toy.STEP_SCALE)[:, None].expand(16, 10, 3)
    wrong = torch.cat([steps, data["actions"][..., 3:]], dim=-1)
    missed = train_toy.evaluate(FixedActions(cfg, wrong), data, prune=False, device="cpu")
    assert (missed["nearest"], missed["success"], missed["success_015"]) == (0, 0, 0)
    # Halfway there: a success exactly where the half left over is under 0.25.
    half = torch.cat([data["actions"][..., :3] / 2, data["actions"][..., 3:]], dim=-1)
    short = (data["goal"] - data["state"]).norm(dim=-1) / 2                            # [B] distance left
    halfway = train_toy.evaluate(FixedActions(cfg, half), data, prune=False, device="cpu")
    assert halfway["success"] == pytest.approx(float((short < 0.25).float().mean()), abs=1e-4)


class FixedRecords(torch.nn.Module):
    """Stands in for the model in `evaluate` and `keep_maps`: zero actions, and LFP records that
    keep exactly the given sequence positions ({layer: one list of positions per sample})."""

    def __init__(self, cfg, kept):
        super().__init__()
        self.cfg, self.kept = cfg, kept

    def forward(self, images, text_ids, state, actions=None, prune=True):
        B, N = state.shape[0], self.cfg.seq_len
        records = []
        for layer, rows in self.kept.items():
            width = max(len(r) for r in rows[:B])
            idx = torch.tensor([sorted(r) + [0] * (width - len(r)) for r in rows[:B]])   # padded with BOS
            records.append(cm.LFPRecord(layer, idx, torch.zeros(B, N)))
        return cm.CogVLAOutput(torch.zeros(B, self.cfg.chunk_len, self.cfg.action_dim), None, records)


def positions(mask_row, cfg):
    """The sequence positions of the vision patches set in mask_row [V]."""
    return [cfg.vision_start + int(i) for i in mask_row.nonzero()[:, 0]]


def test_toy_kept_shares_count_the_named_and_other_blocks_patches_a_hand_built_record_keeps():
    cfg = train_toy.toy_config()
    data = train_toy.make_batch(6, seed=31)
    forced = [0] + list(range(cfg.text_start, cfg.seq_len))
    named = [positions(data["named_patches"][b], cfg) for b in range(6)]
    other = [positions(data["other_patches"][b], cfg) for b in range(6)]
    kept = {1: [forced + named[b] + other[b][:2] for b in range(6)],   # the named block, 2 others' patches
            2: [forced + other[b] for b in range(6)]}                  # the other blocks only
    m = train_toy.evaluate(FixedRecords(cfg, kept), data, prune=True, device="cpu")
    two_others = sum(min(2, len(o)) for o in other) / sum(len(o) for o in other)
    assert m["kept_share"] == {1: 1.0, 2: 0.0}, m["kept_share"]
    assert m["kept_share_other"] == {1: round(two_others, 4), 2: 1.0}, m["kept_share_other"]
    assert m["chance"][1] == round(int(192 * 0.85) / 192, 4)


def keep_map_grid(text, layer, cfg):
    """The keep map printed for `layer`, read back: [3 cams, 8, 8] (kept, named) bools."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"layer {layer} "))
    kept, named = torch.zeros(3, 8, 8, dtype=torch.bool), torch.zeros(3, 8, 8, dtype=torch.bool)
    for row, line in enumerate(lines[start:start + 8]):
        cells = line[8:]
        for cam in range(3):
            for col in range(8):
                cell = cells[cam * 26 + col * 3: cam * 26 + col * 3 + 3]
                kept[cam, row, col], named[cam, row, col] = cell[1] == "#", cell[0] == "["
    return kept, named


def test_toy_keep_maps_show_kept_patches_as_kept_and_dropped_ones_as_dropped():
    cfg = train_toy.toy_config()
    data = train_toy.make_batch(1, seed=9)
    forced = [0] + list(range(cfg.text_start, cfg.seq_len))
    every = list(range(cfg.vision_start, cfg.text_start))
    named = positions(data["named_patches"][0], cfg)
    corner = [cfg.vision_start + cam * 64 for cam in range(3)]               # the top-left patch of each view
    kept = {1: [forced + named], 2: [forced + [p for p in every if p not in named]], 3: [forced + corner]}
    text = train_toy.keep_maps(FixedRecords(cfg, kept), data, "cpu")
    want_named = data["named_patches"][0].view(3, 8, 8)
    for layer, expect in ((1, want_named), (2, ~want_named), (3, torch.zeros(3, 8, 8, dtype=torch.bool))):
        if layer == 3:
            expect[:, 0, 0] = True
        got, brackets = keep_map_grid(text, layer, cfg)
        assert torch.equal(brackets, want_named), f"layer {layer}: the brackets are not the named block's patches"
        assert torch.equal(got, expect), f"layer {layer}: kept cells {got.nonzero().tolist()}, expected {expect.nonzero().tolist()}"


def test_toy_learning_rate_warms_up_holds_then_decays_to_its_floor():
    """The schedule at named steps, from its formula: linear warm-up over the first 5% of the steps
    (from lr/warmup at step 0, not from zero), the peak until 60% of the rest, then half a cosine
    down to 10% of the peak, not to zero."""
    args = train_toy.parse_args(["--steps", "400", "--lr", "1e-3"])
    lr = [train_toy.learning_rate(step, args) for step in range(400)]
    warmup = 20
    assert lr[0] == pytest.approx(1e-3 / warmup) and lr[warmup - 1] == pytest.approx(1e-3)
    assert lr[warmup] == pytest.approx(1e-3) and lr[warmup + int(0.6 * 380)] == pytest.approx(1e-3)
    assert lr[warmup + int(0.8 * 380)] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-6)   # halfway down
    assert min(lr[warmup:]) == pytest.approx(lr[-1]) and lr[-1] == pytest.approx(1e-4, rel=1e-3)   # the floor
    assert all(a <= b for a, b in zip(lr[:warmup], lr[1:warmup + 1])) and all(a >= b for a, b in zip(lr[warmup:], lr[warmup + 1:]))


def test_toy_held_out_scenes_are_not_in_the_training_stream(monkeypatch):
    """Every scene a run trains on is compared with every held-out scene: none is the same."""
    made, real = [], train_toy.make_batch

    def recording(n, seed, **kw):
        batch = real(n, seed, **kw)
        made.append((n, batch))
        return batch
    monkeypatch.setattr(train_toy, "make_batch", recording)
    train_toy.main(["--steps", "3", "--batch-size", "4", "--eval-size", "7", "--curve-size", "3", "--no-maps",
                    "--ground-steps", "1",
                    "--log-every", "1"], log=lambda *_: None)
    held_out = [b for n, b in made if n == 7]
    training = [b for n, b in made if n == 4]
    assert len(held_out) == 1 and len(training) >= 3
    seen = torch.cat([b["blocks"].flatten(1) for b in training])                         # [scenes, 9]
    for scene in held_out[0]["blocks"].flatten(1):
        assert not (seen == scene).all(dim=1).any(), "a held-out scene is one the model trained on"


def test_toy_evaluation_with_aggregation_tokens_reports_no_keep_shares():
    cfg = dataclasses.replace(train_toy.toy_config("agg"), n_agg_tokens=32)
    metrics = train_toy.evaluate(CogVLA(cfg), train_toy.make_batch(4, seed=1), prune=True, device="cpu")
    assert metrics["kept_share"] is None and metrics["kept_share_other"] is None
    assert 0 <= metrics["nearest"] <= 1



def rank_with_a_nan(rank, port, argv):
    """One rank of a 2-process run, started as torchrun starts it (its environment variables). In
    the LFP run, rank 1's batch at step 2 carries a NaN."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    real_make_batch, real_train, mode = train_toy.make_batch, train_toy.train, {}

    def train(args, dense, *rest, **kw):                                    # note which mode is training
        mode["dense"] = dense
        return real_train(args, dense, *rest, **kw)

    def make_batch(n, seed, **kw):
        batch = real_make_batch(n, seed, **kw)
        if rank == 1 and not mode["dense"] and seed == 2 * 2 + 1:           # LFP, step 2 (seed 0, 2 processes)
            batch["actions"][0, 0, 0] = float("nan")
        return batch

    train_toy.train, train_toy.make_batch = train, make_batch               # this (child) process's copy only
    try:
        train_toy.main(argv)
    except FloatingPointError:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)     # at once, freeing nothing: see the gloo deadlock in train_toy


def test_toy_trains_with_two_processes_and_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Two processes, two claims: `--compare` trains dense to the end with 2 processes (rank 0
    alone prints), then a NaN in the LFP run's batch on rank 1 alone stops both ranks at that step
    with the same message, instead of leaving rank 0 waiting in the all-reduce."""
    with socket.socket() as s:                          # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--compare", "--steps", "3", "--no-maps"] + TOY_ARGS
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    ranks = []
    for r in (0, 1):
        with open(logs[r], "w") as log:
            ranks.append(subprocess.Popen([sys.executable, "-c", "import sys, test_train_toy as t; "
                                           f"t.rank_with_a_nan({r}, {port}, sys.argv[1:])", *argv],
                                          cwd=Path(__file__).parent, stdout=log, stderr=subprocess.STDOUT))
    deadline, codes = time.monotonic() + 90, []
    for rank in ranks:
        try:
            codes.append(rank.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            rank.kill()
            codes.append(None)
    out = [log.read_text() for log in logs]
    assert None not in codes, "a NaN on rank 1 left the ranks waiting for each other (no exit within 90 s)"
    assert out[0].count("[dense] step     3/3") == 1 and "[dense]" not in out[1], out[0][-2000:]   # rank 0 alone prints
    assert "2 process(es)" in out[0]
    assert codes == [1, 1], out
    stopped = [text.rsplit("FloatingPointError: ", 1)[-1] for text in out]
    assert stopped[0] == stopped[1], stopped
    assert stopped[0].startswith("[lfp] stopping at step 2: rank 1: non-finite loss nan"), stopped[0]


# ----------------------------------------------------------------------------- the run's pictures

def decode_png(data: bytes):
    """A PNG read back with the standard library alone -> [H, W, 3] uint8; checks every chunk's
    CRC and accepts only what report.png should write (8-bit RGB, filter 0 on every row)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body), f"chunk {kind!r}: bad CRC"
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour) == (8, 2), "expected 8-bit RGB"
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all(), "a row with a filter other than 0"
    return rows[:, 1:].reshape(h, w, 3)


def embedded_pngs(svg_text):
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", svg_text)]


XLINK = "{http://www.w3.org/1999/xlink}href"
SVG_NS = "{http://www.w3.org/2000/svg}"


def test_report_pngs_decode_to_the_rendered_scenes_and_every_svg_parses(tmp_path):
    """A short run's report: every .svg parses as XML, report.html holds each of them, and every
    embedded PNG decodes (CRCs checked) to one of the scenes the figures name, pixel for pixel,
    each pixel a 2 x 2 square (no fading is baked into the PNG: the SVG fades on top)."""
    result = train_toy.main(["--steps", "2", "--out", str(tmp_path)] + SMALL_ARGS, log=lambda *_: None)
    assert result["report"] == str(tmp_path / "report.html")
    svgs = {p.stem: p.read_text() for p in tmp_path.glob("*.svg")}
    assert set(svgs) == {"keep_maps", "instruction_swapped", "curves", "per_layer"}
    page = (tmp_path / "report.html").read_text()
    for name, text in svgs.items():
        assert ElementTree.fromstring(text).tag == SVG_NS + "svg", name
        assert text.strip() in page, f"{name}.svg is not in report.html"
    args = train_toy.parse_args(SMALL_ARGS)
    n = min(3, args.eval_size)                                   # held-out scenes drawn
    scenes = [train_toy.held_out(args)["images"][i] for i in range(n)]
    scenes += [train_toy.make_batch(1, seed=20_000_003 + args.seed)["images"][0]]
    want = [(s.permute(0, 2, 3, 1).reshape(-1, 56, 3) * 255).round().to(torch.uint8).numpy() for s in scenes]
    want = [w.repeat(2, axis=0).repeat(2, axis=1) for w in want]                   # [3 x 112, 112, 3]
    pngs = embedded_pngs(svgs["keep_maps"]) + embedded_pngs(svgs["instruction_swapped"])
    assert len(pngs) == (n + 3) * (1 + 6), "one image per group and column: the scenes, 3 instructions; scene + 6 layers"
    for i, data in enumerate(pngs):
        got = decode_png(data)
        assert any(got.shape == w.shape and np.array_equal(got, w) for w in want), f"PNG {i} is none of the scenes"
    assert np.array_equal(decode_png(pngs[0]), want[0]), "the first keep map is not held-out scene 0"


def kept_cells(svg_text):
    """Per instruction group, per image column (left to right): the set of (camera, row, column)
    that no fade covers, read from the drawn positions alone."""
    root, groups = ElementTree.fromstring(svg_text), []
    for g in root.iter(SVG_NS + "g"):
        images = sorted(g.iter(SVG_NS + "image"), key=lambda e: float(e.get("x")))
        fades = [(float(u.get("x")), float(u.get("y"))) for u in g.iter(SVG_NS + "use") if u.get(XLINK) == "#fade"]
        columns = []
        for image in images:
            x0, y0, cell = float(image.get("x")), float(image.get("y")), float(image.get("width"))
            patch = cell / 8
            faded = {(int((y - y0) // cell), int((y - y0) % cell // patch), int((x - x0) // patch))
                     for x, y in fades if x0 <= x < x0 + cell}
            columns.append({(c, r, q) for c in range(3) for r in range(8) for q in range(8)} - faded)
        groups.append((g.get("data-label"), columns))
    return groups


def test_report_keep_map_draws_exactly_the_kept_token_in_its_cameras_row_and_column():
    """One known vision token kept per LFP layer (a different camera, row and column at each):
    in that layer's column of the picture exactly that patch is drawn unfaded; the first column
    (the scene) is not faded at all. The model's patch order is camera, then row, then column."""
    cfg = train_toy.toy_config()
    data = train_toy.make_batch(1, seed=9)
    forced = [0] + list(range(cfg.text_start, cfg.seq_len))
    cells = {1: (0, 0, 0), 2: (1, 2, 5), 3: (2, 7, 1), 4: (0, 3, 6), 5: (2, 0, 7), 6: (1, 6, 3)}
    kept = {layer: [forced + [cfg.vision_start + c * 64 + r * 8 + q]] for layer, (c, r, q) in cells.items()}
    groups = train_toy.keep_groups(FixedRecords(cfg, kept), data, "cpu", [0])
    svg_text = report.keep_grid("test", groups)
    [(label, columns)] = kept_cells(svg_text)
    assert len(columns) == 1 + len(cells)
    assert len(columns[0]) == 192, "the scene column is faded"
    for (layer, cell), drawn in zip(cells.items(), columns[1:]):
        assert drawn == {cell}, f"layer {layer}: drawn kept {sorted(drawn)}, expected {cell}"
    named, other = data["named_patches"][0].view(3, 8, 8), data["other_patches"][0].view(3, 8, 8)
    for layer, cell in cells.items():                  # the one kept patch, as a share of each set
        want = (float(named[cell]) / float(named.sum()), float(other[cell]) / float(other.sum()))
        assert groups[0]["shares"][layer] == pytest.approx(want), f"layer {layer}: kept shares"


def test_report_swapped_instruction_draws_one_row_per_colour_of_the_scene():
    torch.manual_seed(0)
    model = train_toy.ToyPolicy(train_toy.toy_config()).vla
    args = train_toy.parse_args(SMALL_ARGS)
    history = {"lfp": dict(loss=[(1, 0.5)], held_out=[(1, 0.4, 0.1)], metrics={})}
    with tempfile.TemporaryDirectory() as folder:
        train_toy.draw_report(folder, history, model, args, "cpu")
        text = open(os.path.join(folder, "instruction_swapped.svg")).read()
    labels = [label for label, _ in kept_cells(text)]
    named = [label.split()[2] for label in labels]               # '"pick the red block"' -> red
    assert len(labels) == train_toy.N_BLOCKS and len(set(named)) == train_toy.N_BLOCKS, labels
    assert all(label.split()[0] == labels[0].split()[0] for label in labels), "the verb changed, not only the colour"
    scene_colours = {train_toy.VOCAB[int(i)] for b in range(train_toy.N_BLOCKS) for i in
                     train_toy.make_batch(1, seed=20_000_003 + args.seed, named=[b])["text_ids"][0, 2:3]}
    assert set(named) == scene_colours, f"rows name {named}, the scene's blocks are {scene_colours}"
