"""Executable claims about where_read.py: its interventions withhold exactly what they say."""

import json

import pytest
import torch

import cogvla_mini as cm
import train_toy
import where_read

TOY_ARGS = ["--batch-size", "4", "--eval-size", "4", "--log-every", "1", "--ground-steps", "0", "--prune-warmup", "0"]


def test_toy_run_lowers_the_loss_and_ends_with_one_json_line_and_the_study_of_it(tmp_path):
    """where_read.py trains as train_toy.py does (the same lines, the same JSON) and adds the
    study; studying the checkpoint the run saved gives the same numbers again."""
    lines = []
    where_read.main(["--steps", "20", "--no-maps", "--out", str(tmp_path)] + TOY_ARGS, log=lines.append)
    losses = [float(l.split("loss ")[1].split()[0]) for l in lines if " loss " in l]
    assert len(losses) == 20
    curve = [l for l in lines if "held-out" in l and " step " in l]
    assert len(curve) == 1 and "step    20/20" in curve[0] and "nearest" in curve[0]   # --eval-every 50: the last step
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    result = json.loads(lines[-1])
    assert result["mode"] == "lfp" and result["steps"] == 20
    assert 0 <= result["success"] <= 1 and result["l1"] > 0
    assert set(result["kept_share"]) == set(result["kept_share_other"]) == set(result["chance"]) \
        == {"1", "2", "3", "4", "5", "6"}
    assert list(result["where_read"]) == [
        "as trained", "as trained, but run dense (no token pruned)", "named block dropped at LFP layers 5, 6", "named block dropped at LFP layers 1, 2, 3, 4, 5, 6",
        "other blocks (control) dropped at LFP layers 1, 2, 3, 4, 5, 6", "named block hidden at standard layer 0",
        "named block hidden at standard layer 7", "named block hidden at standard layers 0, 7",
        "other blocks (control) hidden at standard layers 0, 7", "a random choice at every LFP layer, of as many tokens",
        "a random choice, always keeping the named block's patches",
        "a random choice, the named block's patches kept where the router keeps them"]
    assert (result["tokens_processed"], result["flop_bound"]) == (round(cm.account(train_toy.toy_config(), 4).token_share, 4),
                                                                 round(cm.account(train_toy.toy_config(), 4).speedup_bound, 3))
    assert result["where_read"]["as trained"]["success"] == result["success"]   # the same evaluation, untouched
    assert result["chance"]["6"] == pytest.approx(int(192 * 0.2) / 192, abs=1e-4)
    again = where_read.study_checkpoint(str(tmp_path / "lfp.pt"), "cpu", log=lambda *_: None)
    assert again["where_read"] == result["where_read"], "the saved model, studied, gives other numbers"


@pytest.mark.parametrize("flags", [["--dense"], ["--tokens", "agg", "--ground-weight", "0"]])
def test_where_read_is_refused_without_an_lfp_model_on_patches(flags, capsys):
    with pytest.raises(SystemExit):
        where_read.main(flags)
    assert "the study withholds the named block's patches from an LFP model" in capsys.readouterr().err


def test_where_read_refuses_a_checkpoint_it_cannot_read_or_mixed_with_training_flags(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--checkpoint: cannot read"):
        where_read.main(["--checkpoint", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit):
        where_read.main(["--checkpoint", str(tmp_path / "lfp.pt"), "--seed", "3"])
    assert "leave out --seed 3" in capsys.readouterr().err


def test_toy_withheld_patches_are_not_kept_where_dropped_and_not_seen_where_hidden():
    """--where-read's intervention withholds exactly what its report says, and nothing more.
    Dropped at LFP layers 5 and 6: none of the named block's patches is kept there, layers 1-4
    keep what they kept before, and at layer 5 every token kept before is still kept (the freed
    places go to others). Hidden at a standard layer (0 and 7, each called alone): the text,
    state and query rows of its output ignore the named block's rows, still see the other
    blocks' rows, and the vision rows come out as without hiding."""
    torch.manual_seed(0)
    vla = train_toy.ToyPolicy(train_toy.toy_config()).vla.eval()
    cfg, V0, T0 = vla.cfg, vla.cfg.vision_start, vla.cfg.text_start
    batch = train_toy.make_batch(4, seed=7)
    named, other = batch["named_patches"], batch["other_patches"]          # [4, V] each

    def kept(records):   # layer -> [4, N] bool, the tokens the layer kept
        return {r.layer: torch.zeros(4, cfg.seq_len, dtype=torch.bool).scatter(1, r.kept_indices, True)
                for r in records}

    with torch.no_grad():
        embeds = vla.embed(batch["images"], batch["text_ids"], batch["state"])   # [4, N, D]
        before, after = [], []
        vla.llm(embeds, prune=True, records=before)
        with where_read.patches_withheld(vla, named, drop_at=[5, 6]):
            vla.llm(embeds, prune=True, records=after)
    before, after = kept(before), kept(after)
    assert (before[5][:, V0:T0] & named).any() or (before[6][:, V0:T0] & named).any(), \
        "the untrained routers kept no named patch at layers 5-6: nothing to test"
    for layer in (5, 6):
        assert not (after[layer][:, V0:T0] & named).any(), f"named-block patches kept at layer {layer}, where dropped"
    for layer in (1, 2, 3, 4):
        assert torch.equal(before[layer], after[layer]), f"layer {layer} changed: only 5 and 6 were told to drop"
    named_cols = torch.zeros(4, cfg.seq_len, dtype=torch.bool)
    named_cols[:, V0:T0] = named                                           # [4, N]
    lost = before[5] & ~after[5]                                           # kept before, not after
    assert not (lost & ~named_cols).any(), "at layer 5 a token outside the named block lost its place"
    assert after[5].sum() == before[5].sum(), "layer 5 kept fewer tokens: the freed places must go to others"

    x = torch.randn(4, cfg.seq_len, cfg.d_model)
    positions = torch.arange(cfg.seq_len)[None]
    cos, sin = vla.llm.rotary_emb(positions, x.dtype)
    mask = cm.attention_mask(cfg, positions)

    def noise_in(which):   # x with the rows of these patches replaced by noise
        y = x.clone()
        y[:, V0:T0][which] = torch.randn(int(which.sum()), cfg.d_model)
        return y
    with torch.no_grad():
        for i in (0, 7):
            layer = vla.llm.layers[i]
            plain, plain_named = layer(x, cos, sin, mask), layer(noise_in(named), cos, sin, mask)
            with where_read.patches_withheld(vla, named, hide_at=[i]):
                hidden, hidden_named, hidden_other = [layer(y, cos, sin, mask) for y in (x, noise_in(named), noise_in(other))]
            torch.testing.assert_close(hidden[:, T0:], hidden_named[:, T0:], msg=f"hidden at layer {i}, yet the "
                                       f"text/state/query rows changed with the named block's rows: they still see it")
            assert not torch.allclose(hidden[:, T0:], hidden_other[:, T0:]), \
                f"layer {i}: the other blocks' rows change nothing: more than the named block was hidden"
            torch.testing.assert_close(hidden[:, :T0], plain[:, :T0], msg=f"layer {i}: the vision rows changed: "
                                       f"hiding must only stop text, state and queries from seeing the block")
            assert not torch.allclose(plain[:, T0:], plain_named[:, T0:]), f"layer {i}: without hiding, the named rows change nothing"
    with pytest.raises(ValueError, match="layer 3 is an LFP layer"):
        with where_read.patches_withheld(vla, named, hide_at=[3]):
            pass
    with pytest.raises(ValueError, match="layer 0 is not an LFP layer"):
        with where_read.patches_withheld(vla, named, drop_at=[0]):
            pass


def test_toy_random_router_choice_keeps_as_many_tokens_and_the_named_block_when_asked():
    """--where-read's other intervention: each LFP layer keeps a random choice of as many tokens
    (the forced ones still in, the router's probabilities still the weights), or one that always
    keeps the named block's patches; outside the context the router chooses again."""
    torch.manual_seed(0)
    vla = train_toy.ToyPolicy(train_toy.toy_config()).vla.eval()
    cfg = vla.cfg
    batch = train_toy.make_batch(4, seed=7)
    named = batch["named_patches"]                                          # [4, V]
    routed, random_, with_named, again = [], [], [], []
    with torch.no_grad():
        embeds = vla.embed(batch["images"], batch["text_ids"], batch["state"])
        vla.llm(embeds, records=routed)
        with where_read.router_choice_replaced():
            vla.llm(embeds, records=random_)
        with where_read.router_choice_replaced(named):
            vla.llm(embeds, records=with_named)
        vla.llm(embeds, records=again)
    forced = torch.tensor([0] + list(range(cfg.text_start, cfg.seq_len)))
    for r, x, y, z in zip(routed, random_, with_named, again):
        assert r.kept_indices.shape == x.kept_indices.shape == y.kept_indices.shape, f"layer {r.layer}: not as many"
        for kept in (x.kept_indices, y.kept_indices):
            assert all(set(forced.tolist()) <= set(row.tolist()) for row in kept), f"layer {r.layer}: a forced token out"
        assert not torch.equal(r.kept_indices, x.kept_indices), f"layer {r.layer}: the router's own choice"
        if r.layer == routed[0].layer:   # the same input there: the weights are still the router's
            assert torch.equal(r.keep_probs, x.keep_probs)
        is_kept = torch.zeros(4, cfg.seq_len, dtype=torch.bool).scatter(1, y.kept_indices, True)[:, 1:cfg.text_start]
        room = y.kept_indices.shape[1] - len(forced)                        # vision tokens this layer keeps
        for b in range(4):
            assert (is_kept[b] & named[b]).sum() == min(int(named[b].sum()), room), f"layer {r.layer}: named block left out"
        assert torch.equal(r.kept_indices, z.kept_indices), "after the context the router chooses again"


def test_random_choice_as_the_router_keeps_and_drops_the_named_block_where_the_router_would():
    """The control for "do the routers' other choices matter?": at every LFP layer the named
    block's patches are kept exactly where that layer's router (on that pass's input) keeps
    them, dropped where it drops them, and the rest of the choice is random, as many tokens."""
    torch.manual_seed(0)
    vla = train_toy.ToyPolicy(train_toy.toy_config(layout="route")).vla.eval()
    cfg = vla.cfg
    batch = train_toy.make_batch(4, seed=7)
    named = batch["named_patches"]                                          # [4, V]
    records = []
    with torch.no_grad():
        embeds = vla.embed(batch["images"], batch["text_ids"], batch["state"])
        with where_read.router_choice_replaced(named, as_the_router=True):
            vla.llm(embeds, records=records)

    def vision_kept(idx):
        return torch.zeros(4, cfg.seq_len, dtype=torch.bool).scatter(1, idx, True)[:, cfg.vision_start:cfg.text_start]
    differs = 0
    for r in records:
        kept = vision_kept(r.kept_indices)
        own = vision_kept(cm.select(r.keep_probs, r.kept_indices.shape[1], cfg))   # the router's choice
        assert torch.equal(kept & named, own & named), f"layer {r.layer}: the named block not as the router chose"
        assert (own & named).any() and (named & ~own).any(), f"layer {r.layer}: nothing to test (all or none kept)"
        differs += not torch.equal(kept, own)
    assert differs == len(records), "the rest of the choice was the router's, not random"
