"""Course assignments cut from cogvla_mini.py: the exercise registry, handouts and grading.

python course.py exercises                                   list them
python course.py handout --exercises rope,select --out DIR   a student copy, chosen regions stubbed
python course.py grade [DIR]                                 one row per exercise, then one JSON line
python course.py grade --isolate REFERENCE DIR               each exercise with only its own regions
                                                             from DIR, every other one from REFERENCE
"""

import argparse
import contextlib
import dataclasses
import faulthandler
import functools
import importlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch


# =============================================================================== exercises: registry and tags
#
# Course assignments (README "Course assignments"). The bodies of the functions that carry the ideas sit
# between `# --- exercise <id>: begin ---` and `# --- exercise <id>: end ---` lines in cogvla_mini.py;
# `python course.py handout` replaces chosen regions with stubs, `grade` runs the tests tagged
# @exercise(<id>) below. Each test runs inside stubs_block (wrapped at the end of this file).

@dataclasses.dataclass(frozen=True)
class Exercise:
    statement: str      # the task, one line
    hint: str           # what to read, which shapes go in and come out
    teaches: str        # for the README's table
    depends: tuple      # exercises whose code runs inside this one's tests
    minutes: int        # a guess for a student who has read the file up to here


EXERCISES = {
    "rmsnorm": Exercise(
        "RMSNorm.forward: x / sqrt(mean(x^2) + eps) over the last dim, then times self.weight.",
        "x [..., D] -> same shape and dtype. Normalise in float32 (x.float(), torch.rsqrt), cast back "
        "to x.dtype, and only then multiply by the weight, as transformers' LlamaRMSNorm does.",
        "Llama's norm, and where the dtype casts go", (), 10),
    "rope": Exercise(
        "RotaryEmbedding.forward (cos and sin of position x theta^(-2i/Dh)), rotate_half and apply_rope.",
        "position_ids [B or 1, N] -> cos, sin [B or 1, N, Dh] in `dtype`, angles computed in float32 and laid "
        "out as cat([freqs, freqs]) (the rotate-half layout); rotate_half pairs dim i with dim i + Dh/2; "
        "apply_rope(x [B, H, N, Dh], cos, sin) broadcasts over heads.",
        "rotary position embedding, the rotate-half layout", (), 25),
    "causal_mask": Exercise(
        "attention_mask: may the token at sequence position token_idx[i] see the one at token_idx[j]?",
        "token_idx [B or 1, K] -> bool [B or 1, 1, K, K] (row = query, column = key). Causal: key <= query. "
        "mask_kind 'catten' adds: the action segment (positions >= cfg.action_start) sees itself both ways. "
        "Compare positions, not row numbers: broadcast [B, K, 1] against [B, 1, K].",
        "causal and V-L-A coupled masks on pruned positions", (), 15),
    "attention": Exercise(
        "Attention.forward: q, k, v projections, RoPE on q and k, GQA, masked softmax(q k^T / sqrt(Dh)) v, o_proj.",
        "x [B, N, D] -> [B, N, D]. GQA: key/value head j serves the n_heads // n_kv_heads consecutive query "
        "heads j*g .. j*g+g-1 (einops repeat 'b h n d -> b (h g) n d'). A bool mask means 'may attend' "
        "(fill the rest with -inf), a float mask is added. Keep the 'sdpa' and 'sdpa_causal' branches "
        "(F.scaled_dot_product_attention).",
        "multi-head attention with grouped key/value heads", ("rope",), 30),
    "swiglu": Exercise(
        "MLP.forward: the SwiGLU feed-forward, down_proj(silu(gate_proj(x)) * up_proj(x)).",
        "x [B, N, D] -> [B, N, D]; F.silu on the gate branch only.",
        "Llama's gated MLP", (), 10),
    "schedule": Exercise(
        "shifted_cos_with_ratio, and the reference's rule in lfp_schedule: which layers prune, and how much.",
        "shifted_cos_with_ratio(average, layer, n_layers) = cos(layer pi / (n_layers - 1)) / 2 + average. In "
        "lfp_schedule, build `table` {layer: ratio}: a layer prunes where curve(cfg.lfp_average, l, L) <= top "
        "(max), and its ratio is floored at `floor` (min). Check with CogVLAConfig(schedule="
        "'shiftedcos_decay_0.85_0.15').lfp_ratios.",
        "the cosine keep schedule and its floor", (), 15),
    "router": Exercise(
        "Router.forward: each token's keep probability, the vision tokens FiLMed by the mean text token first.",
        "h [B, N, D] (already input-normed) -> [B, N]: softmax over self.score's [drop, keep] logits, keep "
        "column. With cfg.router_film: text = mean of h[:, text_start:action_start]; the vision slice "
        "h[:, vision_start:text_start] becomes h * (1 + gamma) + beta (film_scale, film_shift); BOS, text "
        "and action tokens are scored unmodulated.",
        "instruction-conditioned routing (FiLM)", (), 20),
    "select": Exercise(
        "select: the K tokens an LFP layer keeps: BOS and every token from cfg.text_start on, then the most "
        "probable vision tokens.",
        "keep_prob [B, N], k -> long [B, K] sorted by sequence position. Force tokens in by adding +inf to "
        "their scores, take topk, then sort the indices: the layer needs its tokens in sequence order.",
        "force-keep + top-k selection", (), 15),
    "gather_scatter": Exercise(
        "gather_tokens and scatter_tokens: take the kept rows out, and put their new values back.",
        "gather_tokens: x [B, N, D], idx [B, K] -> [B, K, D], out[b, k] = x[b, idx[b, k]] (index x with "
        "arange(B)[:, None] and idx, or torch.gather). scatter_tokens(x, idx, y [B, K, D]) -> a new "
        "[B, N, D]: rows idx replaced by y (y already holds the residual), the others as in x.",
        "gather and scatter with batched indices", (), 20),
    "lfp_layer": Exercise(
        "LFPDecoderLayer.forward_lfp, phases 1-6: score, select, gather, the block on the kept tokens, "
        "scatter back, check and record.",
        "x [B, N, D] -> [B, N, D]. keep_prob = self.router(self.input_layernorm(x)); idx = select(...,"
        " self.n_keep, cfg); gather x and keep_prob at idx; mask = attention_mask(cfg, idx); positions "
        "0..K-1 ('reindex') or idx ('original') through rope(positions, x.dtype); the block's attention "
        "and MLP on the kept tokens, the MLP output times the router weight; scatter_tokens; raise "
        "FloatingPointError naming the layer on inf/NaN if cfg.check_values; append an LFPRecord if "
        "`records` is a list.",
        "the whole LFP layer", ("rmsnorm", "rope", "causal_mask", "attention", "swiglu", "router", "select",
                                "gather_scatter"), 40),
    "vit_film": Exercise(
        "ViTBlock.forward: bidirectional attention, FiLM from the instruction, then the MLP.",
        "x [B', n, W], cond [B', D] -> [B', n, W]: x + proj(attention(norm1(x))) with qkv split as "
        "'b n (three h d)' and F.scaled_dot_product_attention (no mask); x * (1 + gamma) + beta with "
        "gamma = film_scale(cond), beta = film_shift(cond); then x + mlp(norm2(x)).",
        "FiLM conditioning inside a ViT block", (), 20),
    "fusion": Exercise(
        "VisionTower.forward's mix of the two encoders, weighted by the instruction.",
        "weights = softmax(self.fusion(instruction)) [B, 2], repeated per image to [B I, 2]; "
        "fused = w0 * dino + w1 * siglip, dino and siglip [B I, G, D].",
        "instruction-weighted mixture of encoders", ("vit_film",), 10),
}

EXERCISE_STUB = re.compile(r"exercise (\w+): not started( \(\w[\w.]*\))?")  # what a handout's stub raises


def exercise(ex_id):
    """Tag a test as grading exercise `ex_id`: `grade` counts it for that exercise, and
    `pytest -k ex_id` selects it (pytest's -k also matches names set on a test function)."""
    if ex_id not in EXERCISES:
        raise ValueError(f"unknown exercise {ex_id!r}: expected one of {', '.join(EXERCISES)}")

    def tag(test):
        test.exercise = ex_id
        setattr(test, f"exercise_{ex_id}", True)
        return test
    return tag


@contextlib.contextmanager
def stubs_block(own=None):
    """In a handout, an exercise not yet written raises NotImplementedError("exercise <id>: not
    started ..."). A test of that exercise then fails as "not started"; any other test that runs
    into it is skipped as blocked by it, not failed."""
    try:
        yield
    except NotImplementedError as err:
        stub = EXERCISE_STUB.match(str(err))
        if stub is None:
            raise
        # `from None`: the report shows this message alone, not the stub's traceback before it.
        where = stub[2].strip(" ()") if stub[2] else "cogvla_mini.py"   # the function the stub stands in
        if stub[1] == own:
            raise pytest.fail.Exception(f"exercise {own}: not started (the stub in {where} raises "
                                        f"NotImplementedError)", pytrace=False) from None
        raise pytest.skip.Exception(f"blocked by exercise {stub[1]}: {where} not started") from None


def graded(test):
    """Run `test` inside stubs_block; an exercise test's failed assertion becomes its message alone,
    prefixed with the exercise, with no traceback into the test's code."""
    own = getattr(test, "exercise", None)

    @functools.wraps(test)
    def run(*args, **kwargs):
        with stubs_block(own):
            try:
                return test(*args, **kwargs)
            except AssertionError as err:
                if own is None:
                    raise
                # Under `grade` asserts are plain: one without a message is shown as its line of code.
                message = str(err) or f"failed: {traceback.extract_tb(err.__traceback__)[-1].line}"
                raise pytest.fail.Exception(f"exercise {own}: {message}", pytrace=False) from None
    return run


def stubs_left():
    """The exercises whose stub is still in cogvla_mini.py (for tests that run it in another process)."""
    return stubs_in(open(importlib.import_module("cogvla_mini").__file__).read())


def skip_if_stubs_left():
    if left := stubs_left():
        pytest.skip(f"blocked by exercise {left[0]} (not started)")


# A classic mistake is named only when the student's output equals that wrong variant's: each
# `mistakes` entry maps its name to a function computing the variant, run only on a failure.

def describe(t):
    return f"[{', '.join(map(str, t.shape))}] {str(t.dtype).replace('torch.', '')}"


def assert_close(got, want, tol, what, inputs=None, mistakes=None):
    """got == want within tol (max abs difference), or an AssertionError that teaches: the case,
    the inputs, then the shape, then NaN/inf, then the largest difference with its index and both
    values there, and the classic mistake whose output the student's equals, if any."""
    lines = [what]
    if inputs:
        lines.append("inputs: " + ", ".join(f"{name} {describe(t)}" for name, t in inputs.items()))
    if tuple(got.shape) != tuple(want.shape):
        lines.append(f"shape: expected {list(want.shape)}, got {list(got.shape)}")
        raise AssertionError("\n  ".join(lines))
    got64, want64 = got.detach().double(), want.detach().double()
    bad = ~torch.isfinite(got64) & torch.isfinite(want64)
    if bad.any():
        first = tuple(torch.nonzero(bad)[0].tolist())
        lines.append(f"{int(bad.sum())} NaN/inf values where finite ones are expected, the first at index "
                     f"{first} (got {got64[first].item()})")
        raise AssertionError("\n  ".join(lines))
    diff = (got64 - want64).abs()
    if got64.numel() == 0 or diff.max().item() <= tol:
        return
    at = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    lines.append(f"largest difference {diff[at].item():.4g} at index {at}: expected {want64[at].item():.6g}, "
                 f"got {got64[at].item():.6g} ({int((diff > tol).sum())} of {diff.numel()} values off by "
                 f"more than the tolerance {tol:g})")
    for name, variant in (mistakes or {}).items():
        wrong = variant().detach().double()
        if wrong.shape == got64.shape and (wrong - got64).abs().max().item() <= tol:
            lines.append(f"likely mistake: {name} (your output equals that variant's within {tol:g})")
            break
    raise AssertionError("\n  ".join(lines))



def can_fork():
    """A child forked from this process starts with torch imported: ~3 s saved per process over a
    fresh interpreter. Linux only, and only while CUDA is not initialised (a forked child cannot use it)."""
    return sys.platform == "linux" and not torch.cuda.is_initialized()


def start(name, args, log_path):
    """Run this file's function `name`(*args) in a process of its own; returns a handle for
    `finish`. Forked where can_fork(), else a fresh interpreter that imports this file: either
    way the child runs child_main."""
    if not can_fork():
        with open(log_path, "w") as log:            # the child's output, import errors included
            return subprocess.Popen([sys.executable, "-c", "import json, sys, course as t; "
                                     "t.child_main(*json.loads(sys.argv[1]))", json.dumps([str(log_path), name, args])],
                                    cwd=HERE, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    with warnings.catch_warnings():     # Python >= 3.12 warns at any fork of a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            child_main(str(log_path), name, args)
        finally:
            os._exit(1)                 # never return into the parent's code (pytest's session)
    return pid


def child_main(log_path, name, args):
    """The child's side of `start`: its output, Python's and the C++ libraries', goes to log_path;
    it exits 0 when `name`(*args) returns, 1 with the traceback when it raises; on SIGUSR1 it
    writes every thread's stack there (see finish). A forked child must not take over from its
    parent: OpenMP's thread pool (its threads do not exist in the child, whose first parallel op
    would hang: one thread, as torchrun's OMP_NUM_THREADS=1 makes each rank do), nor pytest's
    assertion-rewriting import hook (a graded test file imports as in a fresh interpreter)."""
    with open(log_path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        if hasattr(signal, "SIGUSR1"):
            faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
        try:
            torch.set_num_threads(1)
            sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "AssertionRewritingHook"]
            module, _, function = name.rpartition(":")
            getattr(importlib.import_module(module) if module else sys.modules[__name__], function)(*args)
        except BaseException:
            traceback.print_exc()
            log.flush()
            os._exit(1)     # at once, freeing nothing: see the gloo deadlock in train_toy.train
    os._exit(0)


def finish(children, timeout):
    """Each child's exit code, or None for one still running after `timeout` s: that one is asked
    for its stacks (SIGUSR1: they go to its log), then killed. Children left when this is
    interrupted are stopped the same way."""
    def poll(child):
        if isinstance(child, subprocess.Popen):
            return child.poll()
        done, status = os.waitpid(child, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if done else None

    def stop(child):
        forked = not isinstance(child, subprocess.Popen)
        if hasattr(signal, "SIGUSR1"):
            os.kill(child if forked else child.pid, signal.SIGUSR1)
            time.sleep(1)
        if forked:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        else:
            child.kill()
            child.wait()

    codes, deadline = [None] * len(children), time.monotonic() + timeout
    try:
        while None in codes and time.monotonic() < deadline:
            codes = [code if code is not None else poll(child) for child, code in zip(children, codes)]
            time.sleep(0.05)
    finally:
        for child, code in zip(children, codes):
            if code is None:
                stop(child)
    return codes


# =============================================================================== exercises: handout and grade

HERE = Path(__file__).resolve().parent
PROJECT_FILES = (".ci/run", ".gitignore", "README.md", "bench.py", "cogvla_mini.py", "pytest.ini", "requirements.txt",
                 "test_cogvla_mini.py", "test_course.py", "test_train_toy.py", "course.py", "train_toy.py")
MARKER = re.compile(r"^(?P<indent>[ \t]*)# --- exercise (?P<id>\w+) ---$")
STUB_RAISE = ('raise NotImplementedError("exercise {id}: not started ({where}); '
              'check it with: python -m pytest -k {id}")')


@dataclasses.dataclass
class Region:
    exercise: str
    begin: int      # line index (from 0) of its marker
    end: int        # line index just after its last line
    indent: str     # the markers' indentation, which the body shares


def find_regions(text, where="cogvla_mini.py"):
    """The exercise regions of a source, in order. A region runs from its marker line to the end
    of the block the marker sits in (the rest of the function body); ValueError on a marker that
    is malformed, unknown, outside a function, followed by no code, or inside another region."""
    lines, regions = text.split("\n"), []
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if m is None:
            if "# --- exercise " in line:
                raise ValueError(f"{where}:{i + 1}: malformed marker {line.strip()!r}: expected "
                                 f"'# --- exercise <id> ---' alone on a line")
            continue
        if m["id"] not in EXERCISES:
            raise ValueError(f"{where}:{i + 1}: unknown exercise {m['id']!r}: expected one of "
                             f"{', '.join(EXERCISES)}")
        if not m["indent"]:
            raise ValueError(f"{where}:{i + 1}: exercise {m['id']}: the marker must be inside a "
                             f"function body, at the indentation of the code it marks")
        if regions and regions[-1].begin < i < regions[-1].end:
            raise ValueError(f"{where}:{i + 1}: exercise {m['id']} begins inside exercise "
                             f"{regions[-1].exercise} (begun at line {regions[-1].begin + 1}): "
                             f"regions do not nest, one marker per block")
        end = i + 1
        for j in range(i + 1, len(lines)):
            if lines[j].strip() and not lines[j].startswith(m["indent"]):
                break
            if lines[j].strip():
                end = j + 1                 # the last line of the block, blank lines after it left out
        if end == i + 1:
            raise ValueError(f"{where}:{i + 1}: exercise {m['id']}: no code follows the marker at "
                             f"its indentation")
        regions.append(Region(m["id"], i, end, m["indent"]))
    return regions


def region_bodies(text, where="cogvla_mini.py"):
    """{exercise: [the lines inside its first region, its second, ...]}"""
    lines = text.split("\n")
    bodies = {}
    for r in find_regions(text, where):
        bodies.setdefault(r.exercise, []).append(lines[r.begin + 1:r.end])
    return bodies


def with_bodies(text, new, where="cogvla_mini.py"):
    """`text` with the regions of each exercise in `new` ({exercise: [body per region]}) replaced."""
    lines, out, pos, count = text.split("\n"), [], 0, {}
    regions = find_regions(text, where)
    for ex, bodies in new.items():
        have = sum(r.exercise == ex for r in regions)
        if have != len(bodies):
            raise ValueError(f"{where}: exercise {ex} has {have} region(s), the replacement {len(bodies)}")
    for r in regions:
        if r.exercise in new:
            k = count[r.exercise] = count.get(r.exercise, -1) + 1
            out += lines[pos:r.begin + 1] + new[r.exercise][k]
            pos = r.end
    return "\n".join(out + lines[pos:])


def enclosing_function(lines, i):
    """The name of the def (with its class, if any) that line i sits in: `Router.forward`, `select`."""
    names, indent = [], len(lines[i]) - len(lines[i].lstrip())
    for line in reversed(lines[:i]):
        m = re.match(r"(\s*)(?:def|class) (\w+)", line)
        if m and len(m[1]) < indent:
            names.insert(0, m[2])
            indent = len(m[1])
    return ".".join(names)


def stub_body(ex_id, region, part, lines):
    """The stub that replaces one region: the statement, the hint and the NotImplementedError."""
    ex, indent, width = EXERCISES[ex_id], region.indent, 100 - len(region.indent) - 2
    where = enclosing_function(lines, region.begin)
    head = f"Exercise {ex_id}" + (f", part {part[0]} of {part[1]} ({where})" if part[1] > 1 else "")
    comment = textwrap.wrap(f"{head}: {ex.statement}", width) + textwrap.wrap(f"Hint: {ex.hint}", width)
    return [f"{indent}# {line}" for line in comment] + [indent + STUB_RAISE.format(id=ex_id, where=where)]


def stub_bodies(text, ids):
    """{exercise: [stub per region]} for the exercises `ids` of a source text."""
    lines, regions = text.split("\n"), find_regions(text)
    stubs = {}
    for ex_id in ids:
        mine = [r for r in regions if r.exercise == ex_id]
        stubs[ex_id] = [stub_body(ex_id, r, (k + 1, len(mine)), lines) for k, r in enumerate(mine)]
    return stubs


def stubs_in(text):
    return sorted(set(re.findall(r'raise NotImplementedError\("exercise (\w+): not started', text)))


def parse_exercise_ids(spec):
    ids = list(EXERCISES) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [i for i in ids if i not in EXERCISES]
    if unknown or not ids:
        raise ValueError(f"--exercises: unknown exercise(s) {', '.join(unknown) or '(none given)'}; expected 'all' "
                         f"or ids separated by commas, from: {', '.join(EXERCISES)}")
    return list(dict.fromkeys(ids))


def removed_lines_left(folder, removed):
    """[(line, file)] for each removed line of code still found in a file of `folder`. Lines too
    generic to give anything away (under 20 characters: `else:`, `cfg = self.cfg`) are not counted."""
    telling = {line.strip() for line in removed if len(line.strip()) >= 20}
    found = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        present = {line.strip() for line in path.read_text(errors="replace").split("\n")}
        found += [(line, path.name) for line in sorted(telling & present)]
    return found


def make_handout(ids, out, project=HERE, log=print):
    """Write the project to `out` with the regions of `ids` replaced by stubs; check it first."""
    out, project = Path(out), Path(project)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty directory; nothing written")
    source = (project / "cogvla_mini.py").read_text()
    bodies = region_bodies(source)
    missing = [i for i in ids if i not in bodies]
    if missing:
        raise ValueError(f"{project / 'cogvla_mini.py'}: no region for exercise(s) {', '.join(missing)}")
    stubbed = with_bodies(source, stub_bodies(source, ids))
    removed = [line for i in ids for body in bodies[i] for line in body]
    with tempfile.TemporaryDirectory() as tmp:
        draft = Path(tmp) / "handout"
        for name in PROJECT_FILES:
            if (project / name).exists():
                (draft / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(project / name, draft / name)
        (draft / "cogvla_mini.py").write_text(stubbed)
        rows = check_handout(draft, ids, source, removed, log)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(draft, out, dirs_exist_ok=True)
    log(f"handout written to {out}: {len(ids)} exercise(s) stubbed ({', '.join(ids)}); "
        f"students check one with `python -m pytest -k <id>`, the whole with `python course.py grade`")
    return rows


def check_handout(draft, ids, source, removed, log):
    """The handout's own checks; ValueError (and nothing written) on the first that fails."""
    text = (draft / "cogvla_mini.py").read_text()
    if [r.exercise for r in find_regions(text)] != [r.exercise for r in find_regions(source)]:
        raise ValueError("handout check: the stubbed file's regions differ from the reference's; nothing written")
    log("handout check 1/2: markers balanced, not nested; no removed line of code left in any file ...")
    if leaks := removed_lines_left(draft, removed):
        raise ValueError("handout check: removed lines still appear in the handout; nothing written\n" +
                         "\n".join(f"  {file}: {line}" for line, file in leaks))
    log("handout check 2/2: grading the handout: it must import, the chosen exercises be 'not started', "
        "and no other fail ...")
    rows = grade(draft, log=lambda *_: None)
    if any(r["first_failure"].startswith("could not collect") for r in rows):
        raise ValueError(f"handout check: the stubbed cogvla_mini.py does not import; nothing written\n"
                         f"{rows[0]['first_failure']}")
    def as_expected(row):
        if row["total"] == 0:
            return False
        if row["exercise"] in ids:
            return row["status"] == "not started"
        blocker = re.match(r"blocked by exercise (\w+)", row["first_failure"])
        return row["status"] == "passed" or row["status"] == "blocked" and blocker is not None and blocker[1] in ids

    if wrong := [r for r in rows if not as_expected(r)]:
        raise ValueError("handout check: grading the handout gave\n" + format_grade(wrong) + "\nnothing written")
    return rows


# ----------------------------------------------------------------------------- grading

class ExerciseResults:
    """A pytest plugin: run only the tests of the given exercises, and record each one's outcome."""

    def __init__(self, exercises):
        self.exercises, self.tests, self.errors = set(exercises), {}, []

    def pytest_collection_modifyitems(self, config, items):
        chosen = [i for i in items if getattr(getattr(i, "function", None), "exercise", None) in self.exercises]
        config.hook.pytest_deselected(items=[i for i in items if i not in chosen])
        items[:] = chosen
        for item in chosen:
            self.tests[item.nodeid] = {"exercise": item.function.exercise, "outcome": None, "message": ""}

    def pytest_collectreport(self, report):
        if report.failed:     # e.g. cogvla_mini.py does not import
            lines = [line for line in report.longreprtext.strip().split("\n") if line.strip(" ^~")]
            self.errors.append("could not collect the tests:\n" + "\n".join(lines[-4:]))

    def pytest_runtest_logreport(self, report):
        test = self.tests.get(report.nodeid)
        if test is None or test["outcome"] not in (None, "passed"):
            return
        if report.failed:
            text = report.longreprtext.strip()
            crash = getattr(report.longrepr, "reprcrash", None)
            if not text.startswith("exercise ") and crash is not None:    # the student's code raised: say where
                text = f"{crash.message} (at {Path(crash.path).name}:{crash.lineno})"
            own = f"exercise {test['exercise']}: not started"
            test["outcome"], test["message"] = ("not started" if text.startswith(own) else "failed"), text
        elif report.skipped:
            reason = (report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr))
            reason = reason.removeprefix("Skipped: ")
            test["outcome"], test["message"] = ("blocked" if reason.startswith("blocked by") else "skipped"), reason
        elif report.when == "call":
            test["outcome"] = "passed"


def run_exercise_tests(results_file, runs):
    """In a process of its own (see grade, start): for each "WORKDIR=ID,ID" run those exercises' tests in
    WORKDIR, which holds a cogvla_mini.py to grade, this test file and train_toy.py."""
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"     # no plugin of another project (this process only)
    results = []
    for run in runs:
        workdir, ids = run.rsplit("=", 1)
        for name in ("cogvla_mini", "bench", "course", "test_cogvla_mini"):
            sys.modules.pop(name, None)                                 # import the workdir's copies
        plugin = ExerciseResults(ids.split(","))
        # Plain asserts (every exercise test says what failed) and no unraisable-exception plugin:
        # its gc passes and pytest's assert rewriting cost ~1.3 s per run, 12 runs with --isolate.
        code = pytest.main([str(Path(workdir) / "test_cogvla_mini.py"), "--assert=plain", "-p", "no:cacheprovider",
                            "-p", "no:terminal", "-p", "no:unraisableexception"], plugins=[plugin])
        if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
            plugin.errors.append(f"pytest stopped: {code!r}")
        results.append({"exercises": ids.split(","), "tests": list(plugin.tests.values()), "errors": plugin.errors})
    Path(results_file).write_text(json.dumps(results))


GRADING_TIME_LIMIT = 600   # s; the reference's exercise tests take ~3 s: far more is a student's endless loop


class GradingError(RuntimeError):
    """The grading process failed or did not finish: the message says how."""


def grade(student, reference=None, log=print):
    """One row per exercise: status, tests passed of total, the first failure's message. With a
    `reference` folder, each exercise runs on the reference's cogvla_mini.py with only that
    exercise's regions taken from the student's, so one mistake does not fail every exercise
    built on it."""
    student = Path(student)
    mine = (student / "cogvla_mini.py").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        def workdir(name, text):
            folder = Path(tmp) / name
            folder.mkdir()
            (folder / "cogvla_mini.py").write_text(text)
            for helper in ("test_cogvla_mini.py", "course.py", "bench.py"):   # the grading file and what it imports
                shutil.copy2(HERE / helper, folder / helper)
            return str(folder)

        if reference is None:
            runs = [f"{workdir('all', mine)}={','.join(EXERCISES)}"]
        else:
            theirs = (Path(reference) / "cogvla_mini.py").read_text()
            bodies = region_bodies(mine, str(student / "cogvla_mini.py"))
            absent = [ex for ex in EXERCISES if ex not in bodies]
            if absent:
                raise ValueError(f"{student / 'cogvla_mini.py'}: no region for exercise(s) {', '.join(absent)}: "
                                 f"its '# --- exercise <id>' marker lines must stay")
            composed = {}                   # exercises whose composed files are identical run once, together
            for ex in EXERCISES:
                composed.setdefault(with_bodies(theirs, {ex: bodies[ex]}), []).append(ex)
            runs = [f"{workdir(exs[0], text)}={','.join(exs)}" for text, exs in composed.items()]
        log(f"grading {student / 'cogvla_mini.py'}" + (f" in isolation against {reference}" if reference else "")
            + f": {len(EXERCISES)} exercises ...")
        results_file, log_path = Path(tmp) / "results.json", Path(tmp) / "grading.log"
        [code] = finish([start("run_exercise_tests", [str(results_file), runs], log_path)], GRADING_TIME_LIMIT)
        output = log_path.read_text()
        if code is None:    # the log holds the stacks, innermost call first
            raise GradingError(f"the grading run did not finish within {GRADING_TIME_LIMIT} s (an endless loop?); "
                               "where it was:\n" + "\n".join(output.splitlines()[:12]))
        if not results_file.exists():
            raise GradingError(f"the grading run failed (exit {code}):\n{output[-6000:]}")
        results = json.loads(results_file.read_text())
    return grade_rows(results, stubs_in(mine))


def grade_rows(results, stubbed):
    rows = []
    for ex in EXERCISES:
        ran = [r for r in results if ex in r["exercises"]]
        tests = [t for r in ran for t in r["tests"] if t["exercise"] == ex and t["outcome"] != "skipped"]
        errors = [e for r in ran for e in r["errors"]]
        passed = sum(t["outcome"] == "passed" for t in tests)

        def first(outcome):
            """The first message of this outcome, preferring one that names a classic mistake."""
            messages = [t["message"] for t in tests if t["outcome"] == outcome]
            return next((m for m in messages if "likely mistake" in m), messages[0] if messages else "")

        if errors:
            status, message = "failed", errors[0]
        elif first("failed"):
            status, message = "failed", first("failed")
        elif ex in stubbed or any(t["outcome"] == "not started" for t in tests):
            status, message = "not started", first("not started") or first("blocked")
        elif any(t["outcome"] == "blocked" for t in tests):
            status, message = "blocked", first("blocked")
        elif tests and passed == len(tests):
            status, message = "passed", ""
        else:
            status, message = "failed", "no test of this exercise ran"
        rows.append({"exercise": ex, "status": status, "passed": passed, "total": len(tests), "first_failure": message})
    return rows


def format_grade(rows):
    lines = [f"{'exercise':<15} {'status':<12} {'tests':>6}  first failure"]
    for r in rows:
        message = r["first_failure"].split("\n")
        lines.append(f"{r['exercise']:<15} {r['status']:<12} {r['passed']:>3}/{r['total']:<2}  {message[0]}")
        lines += [" " * 38 + m.strip() for m in message[1:]]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python course.py",
                                     description="Course assignments cut from cogvla_mini.py (README: Course assignments).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("exercises", help="list the exercises: id, minutes, depends on, statement")
    h = sub.add_parser("handout", help="write a copy of the project with the chosen exercises stubbed")
    h.add_argument("--exercises", required=True, help="'all', or ids separated by commas")
    h.add_argument("--out", required=True, help="a new or empty directory")
    g = sub.add_parser("grade", help="grade a copy of the project: one row per exercise, then one JSON line")
    g.add_argument("dir", nargs="?", default=str(HERE), help="the student's folder (default: this file's)")
    g.add_argument("--isolate", metavar="REFERENCE", help="the reference folder: each exercise is graded with only "
                   "its own regions from DIR and every other region from REFERENCE")
    args = parser.parse_args(argv)
    try:
        if args.command == "exercises":
            print(f"{'id':<15} {'min':>3}  {'depends on':<24} statement")
            for ex_id, ex in EXERCISES.items():
                depends = ", ".join(ex.depends) if len(ex.depends) < 3 else "most of the decoder"
                print(f"{ex_id:<15} {ex.minutes:>3}  {depends or '-':<24} {ex.statement}")
        elif args.command == "handout":
            make_handout(parse_exercise_ids(args.exercises), args.out)
            return 0
        elif args.command == "grade":
            rows = grade(args.dir, args.isolate, log=lambda m: print(m, file=sys.stderr))
            print(format_grade(rows))
            print(json.dumps({"exercises": rows, "passed": sum(r["status"] == "passed" for r in rows),
                              "total": len(rows)}))
            return 0 if all(r["status"] == "passed" for r in rows) else 1
    except (ValueError, FileNotFoundError, GradingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def wrap_tests(namespace):
    """Every test runs inside stubs_block (see `graded`), so that in a handout an exercise not yet
    written skips the tests it blocks instead of failing them. A test file calls this once, at its end."""
    for name, test in list(namespace.items()):
        if name.startswith("test_") and inspect.isfunction(test):
            namespace[name] = graded(test)


if __name__ == "__main__":
    sys.exit(main())
