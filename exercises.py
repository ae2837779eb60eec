"""The course's exercises, and what checks a student's code: what ships with every handout."""

from __future__ import annotations

import dataclasses
import faulthandler
import importlib.util
import io
import lzma
import re
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch


# %% The exercises =============================================================================

@dataclasses.dataclass(frozen=True)
class Exercise:
    statement: str      # the task, one line
    hint: str           # what goes in and out, and why; not the solution's lines
    teaches: str        # one line for the list
    depends: tuple      # exercises whose code runs inside this one's tests
    points: int         # its weight in a grade (our guess of the minutes it takes)


EXERCISES = {
    "rmsnorm": Exercise(
        "RMSNorm.forward: x over the root mean square of its last dim (plus eps), times the weight.",
        "x [..., D] -> the same shape and dtype. Why float32: in bf16 a mean of squares loses most of "
        "its digits. transformers' Llama casts back to x's dtype before it scales by the weight; bf16 "
        "outputs match it only in that order.",
        "Llama's norm, and where the dtype casts go", (), 10),
    "rope": Exercise(
        "RotaryEmbedding.forward, rotate_half and apply_rope: rotary position embedding.",
        "position_ids [B or 1, N] -> cos, sin [B or 1, N, Dh] in `dtype`. Frequency i is theta^(-2i/Dh); "
        "the angles must not be rounded to bf16 before cos and sin. Llama's layout pairs dimension i "
        "with i + Dh/2 (not neighbours), and each pair turns like a complex number. apply_rope: x [B, H, "
        "N, Dh], the same cos and sin for every head.",
        "rotary position embedding, the rotate-half layout", (), 25),
    "causal_mask": Exercise(
        "attention_mask: may the token at sequence position token_idx[i] see the one at token_idx[j]?",
        "token_idx [B or 1, K] -> bool [B or 1, 1, K, K], row = query, column = key. The rule is about "
        "sequence positions, not row numbers: an LFP layer passes the positions it kept. 'catten': the "
        "action segment (from cfg.action_start) sees itself both ways, and nothing earlier sees it.",
        "causal and V-L-A coupled masks on pruned positions", (), 15),
    "attention": Exercise(
        "Attention.forward: projections, RoPE on q and k, grouped K/V heads, masked softmax, o_proj.",
        "x [B, N, D] -> [B, N, D], heads of Dh = D / H. With GQA each key/value head serves H / Hkv "
        "consecutive query heads. A bool mask means 'may attend', a float mask is added. Keep the "
        "'sdpa' and 'sdpa_causal' branches working too.",
        "multi-head attention with grouped key/value heads", ("rope",), 30),
    "swiglu": Exercise(
        "MLP.forward: Llama's gated feed-forward (SwiGLU).",
        "x [B, N, D] -> [B, N, D] through F hidden units: a SiLU-gated branch times a linear branch, "
        "then back down to D.",
        "Llama's gated MLP", (), 10),
    "schedule": Exercise(
        "shifted_cos_with_ratio and shifted_schedule: which layers prune, and how much.",
        "The reference's curve is a half cosine over the layers, from average + 1/2 at layer 0 to "
        "average - 1/2 at the last layer. A layer prunes where the curve is at or below `top`, and "
        "keeps at least `floor` of the vision tokens. Try CogVLAConfig(schedule="
        "'shiftedcos_decay_0.85_0.15').lfp_ratios.",
        "the cosine keep schedule and its floor", (), 15),
    "router": Exercise(
        "Router.forward: each token's keep probability, the vision tokens FiLMed by the text first.",
        "h [B, N, D] (already normed) -> [B, N], the 'keep' column of a 2-way softmax. The FiLM reads "
        "the average text token; it modulates only the vision tokens, so that untrained (gamma = beta "
        "= 0) it changes nothing.",
        "instruction-conditioned routing (FiLM)", (), 20),
    "select": Exercise(
        "select: the K tokens an LFP layer keeps.",
        "keep_prob [B, N], k -> long [B, K]. BOS, the text and the action segment are always kept; of "
        "the vision tokens, the most probable. The layer needs its tokens in sequence order, and it "
        "still needs keep_prob as it was.",
        "force-keep + top-k selection", (), 15),
    "gather_scatter": Exercise(
        "gather_tokens and scatter_tokens: take the kept rows out, and put their new values back.",
        "gather_tokens: x [B, N, D], idx [B, K] -> [B, K, D], each sample its own rows. "
        "scatter_tokens(x, idx, y [B, K, D]) -> a new [B, N, D]; y already holds the residual, and x "
        "itself must stay as it was.",
        "gather and scatter with batched indices", (), 20),
    "lfp_layer": Exercise(
        "LFPDecoderLayer.forward_lfp, phases 1-6: score, select, gather, the block, scatter back.",
        "x [B, N, D] -> [B, N, D]. Read the phases in the docstrings of Router, select, gather_tokens "
        "and scatter_tokens; the block on the kept tokens is the layer's own attention and MLP, its "
        "MLP output scaled by the router weight. Positions: 0..K-1 ('reindex') or the kept ones. Check "
        "for inf/NaN (naming the layer) when cfg.check_values, and append an LFPRecord to `records`.",
        "the whole LFP layer", ("rmsnorm", "rope", "causal_mask", "attention", "swiglu", "router",
                                "select", "gather_scatter"), 40),
    "vit_film": Exercise(
        "ViTBlock.forward: bidirectional attention, FiLM from the instruction, then the MLP.",
        "x [B', n, W], cond [B', D] -> [B', n, W]. A pre-norm block with no mask; FiLM sits between "
        "the attention and the MLP, and with gamma = beta = 0 it must be the identity.",
        "FiLM conditioning inside a ViT block", (), 20),
    "fusion": Exercise(
        "VisionTower.forward's mix of the two encoders, weighted by the instruction.",
        "self.fusion(instruction) [B, 2] gives two logits per sample; dino and siglip are [B I, G, D] "
        "(each sample's I images in a row); the result is [B, V, D], V = I x G.",
        "instruction-weighted mixture of encoders", ("vit_film",), 10),
}


# %% Checking a student's code: cases, and messages that teach =================================

@dataclasses.dataclass
class Case:
    """One check of an exercise: `call` (one of the call_ functions below) runs the student's code
    on `inputs`, and each of its outputs is compared with `want`. The instructor's tests build
    cases from naive references; a handout stores them, the classic mistakes' outputs computed."""
    what: str                 # a failure's first line: which function, which case
    call: Callable            # call_<name>(cm, **inputs) -> {output name: tensor}
    inputs: dict              # the call's arguments: tensors, numbers, strings, dicts of them
    want: dict = dataclasses.field(default_factory=dict)      # output name -> expected tensor
    tol: dict = dataclasses.field(default_factory=dict)       # output -> largest difference allowed
    mistakes: dict = dataclasses.field(default_factory=dict)  # name -> {output: tensor or thunk}
    dtypes: dict = dataclasses.field(default_factory=dict)    # output name -> expected dtype name
    allowed_off: int = 0      # values allowed beyond tol (bf16 rounding may flip a few)
    raises: str | None = None  # "ErrorType: text it must contain", instead of outputs
    exercise: str = ""        # set by cases_of, from the test's exercise mark
    test: str = ""            # the instructor's test that made it: the claim


def describe(t):
    return f"[{', '.join(map(str, t.shape))}] {str(t.dtype).replace('torch.', '')}"


def assert_close(got, want, tol, what, inputs=None, mistakes=None, allowed_off=0):
    """got == want within tol (max abs difference, at most `allowed_off` values beyond it), or an
    AssertionError that teaches: the case, the inputs, then the shape, then NaN/inf, then the
    largest difference with its index and both values there, and the classic mistake whose
    output the student's equals, if any (`mistakes`: name -> tensor, or a function giving it)."""
    lines = [what]
    if inputs:
        shown = {n: t for n, t in inputs.items() if isinstance(t, torch.Tensor)}
        lines.append("inputs: " + ", ".join(f"{n} {describe(t)}" for n, t in shown.items()))
    if tuple(got.shape) != tuple(want.shape):
        lines.append(f"shape: expected {list(want.shape)}, got {list(got.shape)}")
        raise AssertionError("\n  ".join(lines))
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    bad = ~torch.isfinite(got64) & torch.isfinite(want64)
    if bad.any():
        first = tuple(torch.nonzero(bad)[0].tolist())
        lines.append(f"{int(bad.sum())} NaN/inf values where finite ones are expected, the first "
                     f"at index {first} (got {got64[first].item()})")
        raise AssertionError("\n  ".join(lines))

    def off(a):
        return int(((a - want64).abs() > tol).sum()) if a.numel() else 0
    if off(got64) <= allowed_off:
        return
    diff = (got64 - want64).abs()
    at = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    lines.append(f"largest difference {diff[at].item():.4g} at index {at}: expected "
                 f"{want64[at].item():.6g}, got {got64[at].item():.6g} ({off(got64)} of "
                 f"{diff.numel()} values off by more than the tolerance {tol:g})")
    for name, variant in (mistakes or {}).items():
        wrong = (variant() if callable(variant) else variant).detach().double().cpu()
        if wrong.shape == got64.shape and int(((wrong - got64).abs() > tol).sum()) <= allowed_off:
            lines.append(f"likely mistake: {name} (your output equals that variant's within {tol:g})")
            break
    raise AssertionError("\n  ".join(lines))


def check(case: Case, cm):
    """Run the case on module `cm` here, in this process, and compare: the tests' check and a
    student's own. (An instructor's grade runs the student's code in a process of its own and
    compares in another: course.py.)"""
    if not case.raises:
        return compare(case, run(case.call, cm, case.inputs))
    try:
        run(case.call, cm, case.inputs)
    except NotImplementedError:   # a stub: not started, or blocked (see conftest.py)
        raise
    except Exception as err:      # the expected kind of error, saying what it must say?
        return compare_error(case, type(err).__name__, str(err))
    compare_error(case, None, "")


def compare(case: Case, got):
    """Each output the case wants, from `got` ({output name: tensor}), against `want`: an
    AssertionError that teaches at the first that differs. Only plain tensors count."""
    for name, want in case.want.items():
        what = case.what if len(case.want) == 1 else f"{case.what}: {name}"
        value = got.get(name) if type(got) is dict else None
        if type(value) is not torch.Tensor:
            raise AssertionError(f"{what}\n  expected a tensor, got {type(value).__name__}")
        if name in case.dtypes and str(value.dtype) != case.dtypes[name]:
            raise AssertionError(f"{what}\n  dtype: expected {case.dtypes[name]}, got {value.dtype}")
        mistakes = {m: outs[name] for m, outs in case.mistakes.items() if name in outs}
        assert_close(value, want, case.tol[name], what, case.inputs, mistakes, case.allowed_off)


def compare_error(case: Case, kind, text):
    """The error a `raises` case expects, against the one raised (kind None: none was)."""
    want_kind, _, want_text = case.raises.partition(": ")
    if kind == want_kind and want_text in text:
        return
    got = f"got {kind}: {text}" if kind else "nothing was raised"
    raise AssertionError(f"{case.what}: expected {want_kind} saying {want_text!r}; {got}")


def exercise_tests(module):
    """[(exercise, test)]: the tests of `module` marked @pytest.mark.exercise(<id>), in order."""
    return [(mark.args[0], test) for name, test in vars(module).items() if name.startswith("test_")
            for mark in getattr(test, "pytestmark", []) if mark.name == "exercise"]


def cases_of(exercise, test) -> list[Case]:
    """The cases an exercise test checks: it is called with a `check` that keeps them."""
    made = []
    test(check=lambda *cases: made.extend(cases))
    return [dataclasses.replace(c, exercise=exercise, test=test.__name__) for c in made]


# How each case runs the student's code (without autograd: see run). Each takes the student's
# module and the case's inputs and returns {output name: tensor}. Modules are built from a config (overrides of tiny()) and
# loaded with the case's weights, so the student's own initialisation does not matter.

@torch.no_grad()
def run(call, cm, inputs):
    return call(cm, **inputs)


def _built(cm, module, state, dtype=torch.float64):
    module = module.to(dtype)
    module.load_state_dict(state)
    return module


def _cfg(cm, cfg):
    return cm.CogVLAConfig.tiny(**cfg)


def call_rmsnorm(cm, x, weight, eps):
    return {"out": _built(cm, cm.RMSNorm(weight.shape[0], eps), {"weight": weight}, weight.dtype)(x)}


def call_rope_cos_sin(cm, head_dim, theta, position_ids, dtype):
    cos, sin = cm.RotaryEmbedding(head_dim, theta)(position_ids, getattr(torch, dtype))
    return {"cos": cos, "sin": sin}


def call_apply_rope(cm, x, cos, sin):
    return {"out": cm.apply_rope(x, cos, sin)}


def call_rope_scores(cm, q, k, pairs, head_dim, theta):
    """q.k after RoPE, for each (query position, key position) pair."""
    rope, scores = cm.RotaryEmbedding(head_dim, theta), []
    for m, n in pairs.tolist():
        cq, sq = rope(torch.tensor([[m]]), torch.float32)
        ck, sk = rope(torch.tensor([[n]]), torch.float32)
        scores.append((cm.apply_rope(q, cq, sq) * cm.apply_rope(k, ck, sk)).sum())
    return {"scores": torch.stack(scores)}


def call_rope_in_bf16_model(cm, cfg, position_ids):
    rope = cm.LlamaDecoder(_cfg(cm, cfg)).to(torch.bfloat16).rotary_emb
    cos, sin = rope(position_ids, torch.bfloat16)
    return {"cos": cos, "sin": sin}


def call_attention_mask(cm, cfg, token_idx):
    return {"mask": cm.attention_mask(_cfg(cm, cfg), token_idx)}


def call_attention(cm, cfg, state, x, cos, sin, mask):
    return {"out": _built(cm, cm.Attention(_cfg(cm, cfg)), state)(x, cos, sin, mask)}


def call_mlp(cm, cfg, state, x):
    return {"out": _built(cm, cm.MLP(_cfg(cm, cfg)), state)(x)}


def call_shifted_cos(cm, average, layers, n_layers):
    return {"ratios": torch.tensor([cm.shifted_cos_with_ratio(average, l, n_layers) for l in layers],
                                   dtype=torch.float64)}


def call_shifted_schedule(cm, curve, average, top, floor, n_layers):
    """The schedule as a tensor [n_layers]: each layer's keep ratio, 0 where it does not prune."""
    curve = {"shiftedcos": cm.shifted_cos_with_ratio, "shiftedlinear": cm.shifted_linear_with_ratio}[curve]
    table = cm.shifted_schedule(curve, average, top, floor, n_layers)
    return {"ratios": torch.tensor([float(table.get(l, 0.0)) for l in range(n_layers)],
                                   dtype=torch.float64)}


def call_router(cm, cfg, state, h):
    return {"keep_prob": _built(cm, cm.Router(_cfg(cm, cfg)), state)(h)}


def call_select(cm, cfg, keep_prob, k):
    before = keep_prob.clone()
    idx = cm.select(before, k, _cfg(cm, cfg))
    return {"idx": idx, "keep_prob": before}     # `before` again: select must leave it as it was


def call_gather_tokens(cm, x, idx):
    return {"out": cm.gather_tokens(x, idx)}


def call_scatter_tokens(cm, x, idx, y):
    x_given = x.clone()
    return {"out": cm.scatter_tokens(x_given, idx, y), "x": x_given}   # x must stay as it was


def call_lfp_layer(cm, cfg, state, x, layer):
    """forward_lfp of decoder layer `layer`: its output, keep probabilities, kept indices, and
    how much the rows it dropped changed (nothing)."""
    llm = _built(cm, cm.LlamaDecoder(_cfg(cm, cfg)), state)
    records = []
    out = llm.layers[layer].forward_lfp(x, torch.arange(x.shape[1])[None], llm.rotary_emb, records)
    kept = torch.zeros(x.shape[:2], dtype=torch.bool)
    if records:
        kept.scatter_(1, records[0].kept_indices, True)
    return {"keep_probs": records[0].keep_probs if records else torch.zeros(0),
            "kept_indices": records[0].kept_indices if records else torch.zeros(0),
            "dropped rows changed by": (out - x)[~kept], "out": out}


def call_lfp_layer_unit_weights(cm, cfg, state, x, layer):
    """forward_lfp with every keep probability 1 (the router replaced)."""
    llm = _built(cm, cm.LlamaDecoder(_cfg(cm, cfg)), state)
    lfp = llm.layers[layer]
    lfp.router.forward = lambda h: torch.ones(h.shape[:2], dtype=h.dtype)
    return {"out": lfp.forward_lfp(x, torch.arange(x.shape[1])[None], llm.rotary_emb)}


def call_lfp_layer_with_inf(cm, cfg, layer, x):
    """A decoder whose LFP layer `layer` has an inf weight, run on x (it must raise)."""
    llm = cm.LlamaDecoder(_cfg(cm, cfg))
    llm.layers[layer].self_attn.o_proj.weight.fill_(float("inf"))
    return {"out": llm(x)}


def call_vit_block(cm, width, heads, mlp_ratio, d_cond, state, x, cond):
    return {"out": _built(cm, cm.ViTBlock(width, heads, mlp_ratio, d_cond), state)(x, cond)}


def call_vision_tower(cm, cfg, state, images, instruction):
    return {"out": _built(cm, cm.VisionTower(_cfg(cm, cfg)), state)(images, instruction)}


CALLS = {name: f for name, f in list(globals().items()) if name.startswith("call_")}


# %% Stored cases: what a handout carries instead of the instructor's tests ====================

def save_cases(cases: list[Case], path):
    """Save the cases, the mistakes' outputs computed and each call by name. A tensor that
    several cases share (a model's weights, an input) is stored once, and the file compressed."""
    seen = {}

    def plain(value):      # thunks evaluated, tensors detached and shared, containers walked
        if callable(value):
            value = value()
        if isinstance(value, torch.Tensor):
            value = value.detach().contiguous()
            key = (value.dtype, value.shape, value.view(-1).view(torch.uint8).numpy().tobytes())
            return seen.setdefault(key, value.clone())
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    stored = [plain({f.name: getattr(case, f.name) for f in dataclasses.fields(case) if f.name != "call"})
              | {"call": case.call.__name__} for case in cases]
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    Path(path).write_bytes(lzma.compress(buffer.getvalue()))


def load_cases(path) -> list[Case]:
    stored = torch.load(io.BytesIO(lzma.decompress(Path(path).read_bytes())), weights_only=True)
    return [Case(**{**c, "call": CALLS[c["call"]]}) for c in stored]


# %% The grading process: outputs for inputs, nothing else ======================================

EXERCISE_STUB = re.compile(r"exercise (\w+): not started( \(\w[\w.]*\))?")  # what a stub raises


def stub_outcome(message, exercise):
    """("not started", why) if `message` is the stub of `exercise` (the test's own), ("blocked",
    why) if another exercise's stub, None if it is no stub's."""
    if not (stub := EXERCISE_STUB.match(message)):
        return None
    where = stub[2].strip(" ()") if stub[2] else "cogvla_mini.py"      # the stub's function
    if stub[1] == exercise:
        return "not started", f"exercise {exercise}: not started (the stub in {where} raises NotImplementedError)"
    return "blocked", f"blocked by exercise {stub[1]}: {where} not started"


def hand_back_outputs(job, out, log, time_limit):
    """What a grading process does (started by course.py): import the cogvla_mini.py that JOB
    names, run each call on its inputs, and save to OUT each call's outputs, or the error it
    raised, as plain data. It compares nothing and knows no expected value: the grade is made in
    a process that never runs the student's code. What it prints goes to LOG, and after
    `time_limit` seconds every thread's stack, and it exits."""
    sys.stdout = sys.stderr = open(log, "a", buffering=1)
    faulthandler.dump_traceback_later(time_limit, exit=True, file=sys.stderr)
    # No folder holding a cogvla_mini.py on the path: `import cogvla_mini` must not find the reference.
    sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "cogvla_mini.py").exists()]
    job = torch.load(job, weights_only=True)
    path, records = job["module"], []
    try:
        spec = importlib.util.spec_from_file_location("cogvla_mini", path)
        cm = sys.modules["cogvla_mini"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cm)
    except Exception as err:
        return torch.save([error_record(err, path, "cogvla_mini.py does not import: ")] * len(job["calls"]), out)
    for call in job["calls"]:
        try:
            outputs = run(CALLS[call["call"]], cm, call["inputs"])
            records.append({"outputs": {k: v.detach().cpu().as_subclass(torch.Tensor).clone()
                                        for k, v in outputs.items()}})
        except Exception as err:
            records.append(error_record(err, path))
    torch.save(records, out)


def error_record(err, module, before=""):
    """An error as data: its kind, and its message with the line of `module` it was raised at."""
    lines = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == module]
    at = f" (at {module}:{lines[-1].lineno})" if lines else ""
    return {"error": type(err).__name__, "message": f"{before}{err}{at}"}

