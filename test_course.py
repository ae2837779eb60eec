"""Executable claims about course.py: exercise regions, handouts and grading."""

import concurrent.futures

import pytest

import cogvla_mini as cm
import course
import test_cogvla_mini
from course import (EXERCISE_STUB, EXERCISES, HERE, PROJECT_FILES, find_regions, format_grade, grade, main,
                    make_handout, region_bodies, skip_if_stubs_left, stubs_left, with_bodies)


# ----------------------------------------------------------------------------- tests of the course tools

def test_every_exercise_has_regions_and_tests_and_dash_k_picks_only_its_own():
    regions = region_bodies(open(cm.__file__).read())
    assert set(regions) == set(EXERCISES), f"exercises without a region: {sorted(set(EXERCISES) - set(regions))}"
    count = dict.fromkeys(EXERCISES, 0)
    for name, test in vars(test_cogvla_mini).items():
        if not name.startswith("test_"):
            continue
        tag = getattr(test, "exercise", None)
        count[tag] = count.get(tag, 0) + 1
        for ex_id in EXERCISES:   # `pytest -k <id>` matches names: an exercise id only in its own tests' names
            assert ex_id not in name or tag == ex_id, f"{name} contains {ex_id!r} but is tagged {tag!r}: rename it"
    assert all(count[ex_id] for ex_id in EXERCISES), f"exercises without tests: {[e for e in EXERCISES if not count[e]]}"


@pytest.mark.parametrize("text, message", [
    ("def f():\n    # --- exercise rope ---\n\nx = 1\n", "f.py:2: exercise rope: no code follows the marker"),
    ("# --- exercise rope ---\nx = 1\n", "f.py:1: exercise rope: the marker must be inside a function body"),
    ("def f():\n    # --- exercise rope ---\n    x = 1\n    # --- exercise select ---\n    y = 2\n",
     "f.py:4: exercise select begins inside exercise rope"),
    ("def f():\n    # --- exercise nope ---\n    x = 1\n", "f.py:2: unknown exercise 'nope'"),
    ("def f():\n    # --- exercise rope\n    x = 1\n", "f.py:2: malformed marker"),
    ("def f():\n    # --- exercise rope: begin ---\n    x = 1\n", "f.py:2: malformed marker .* expected "
     "'# --- exercise <id> ---' alone"),
], ids=["no-code", "outside-a-function", "nested", "unknown-id", "malformed", "begin-end-form"])
def test_marker_mistakes_are_refused_naming_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        find_regions(text, "f.py")


def test_handout_refuses_unknown_ids_a_used_folder_and_broken_markers_writing_nothing(tmp_path, capsys):
    assert main(["handout", "--exercises", "rope,nope", "--out", str(tmp_path / "a")]) == 2
    assert "unknown exercise(s) nope" in capsys.readouterr().err and not (tmp_path / "a").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty directory; nothing written"):
        make_handout(["rope"], used)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
    project = tmp_path / "project"
    project.mkdir()
    source = open(cm.__file__).read()
    (project / "cogvla_mini.py").write_text(source.replace("    # --- exercise select ---",
                                                          "    # --- exercise select ---\n    # --- exercise rope ---", 1))
    with pytest.raises(ValueError, match="begins inside exercise select .* regions do not nest"):
        make_handout(["rope"], tmp_path / "b", project)
    assert not (tmp_path / "b").exists()


def handout_of_all(folder):
    """make_handout grades its own output (every exercise 'not started', nothing else failing) and
    checks that it imports and leaks no removed line; it raises, writing nothing, otherwise."""
    return make_handout(list(EXERCISES), folder / "handout", log=lambda *_: None), folder / "handout"


PLANTED = {   # exercise: (a line of the reference, what a student wrote instead, what `grade` must say)
    "rope": ("    return torch.cat([-x2, x1], dim=-1)  # [..., Dh]", "    return torch.cat([x2, -x1], dim=-1)",
             "minus on the wrong half"),
    "causal_mask": ("    allowed = k <= q ", "    allowed = k >= q ", "mask transposed"),
    "select": ("    return idx.sort(dim=-1).values", "    return idx", "top-k indices left in score order"),
    "gather_scatter": ("    out[batch, idx] = y", "    out[batch, idx] += y", "added instead of replaced"),
    "lfp_layer": ("        y = y + w_kept[..., None] * self.mlp(self.post_attention_layernorm(y))",
                  "        y = x_kept + w_kept[..., None] * (y - x_kept)\n"
                  "        y = y + self.mlp(self.post_attention_layernorm(y))",
                  "the router weight scales the attention output"),
    "router": ("vision * (1 + gamma[:, None]) + beta[:, None]", "vision * gamma[:, None] + beta[:, None]",
               "FiLM as x * gamma + beta"),
    "vit_film": ("x * (1 + gamma[:, None]) + beta[:, None]", "x * gamma[:, None] + beta[:, None]",
                 "FiLM as x * gamma + beta"),
}


def planted_mistakes_graded_in_isolation(folder):
    """All seven mistakes in one student's file, graded with --isolate: (rows, without --isolate)."""
    text = (HERE / "cogvla_mini.py").read_text()
    for ex_id, (right, wrong, _) in PLANTED.items():
        bodies = ["\n".join(body) for body in region_bodies(text)[ex_id]]
        assert sum(b.count(right) for b in bodies) == 1, f"{ex_id}: expected {right!r} once in its regions"
        text = with_bodies(text, {ex_id: [b.replace(right, wrong).split("\n") for b in bodies]})
    (folder / "cogvla_mini.py").write_text(text)
    return grade(folder, HERE, log=lambda *_: None)


# Each of these two jobs grades a copy of the project in a process of its own on one thread (~1 and
# ~3 s alone, forked). The first of their tests starts both, side by side on the two cores.
GRADING_JOBS = {   # the test that needs it: the job
    "test_handout_of_all_is_graded_not_started_and_pasting_the_reference_back_restores_it": handout_of_all,
    "test_isolated_grading_fails_exactly_the_exercises_with_a_classic_mistake_and_names_it":
        planted_mistakes_graded_in_isolation}


@pytest.fixture(scope="session")
def grading_jobs(request, tmp_path_factory):
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield {} if stubs_left() else {job: pool.submit(job, tmp_path_factory.mktemp("grading"))
                                       for test, job in GRADING_JOBS.items() if test in selected}


def test_handout_of_all_is_graded_not_started_and_pasting_the_reference_back_restores_it(grading_jobs):
    skip_if_stubs_left()
    rows, out = grading_jobs[handout_of_all].result()
    assert [(r["exercise"], r["status"]) for r in rows] == [(ex, "not started") for ex in EXERCISES]
    assert all(r["total"] > 0 for r in rows)
    for name in PROJECT_FILES:
        if name != "cogvla_mini.py" and (HERE / name).exists():
            assert (out / name).read_bytes() == (HERE / name).read_bytes(), f"{name}: expected an identical copy"
    reference, handout = (HERE / "cogvla_mini.py").read_text(), (out / "cogvla_mini.py").read_text()
    for ex_id, bodies in region_bodies(handout).items():
        assert all(EXERCISE_STUB.search(body[-1]) and body[-1].strip().startswith("raise NotImplementedError")
                   for body in bodies), f"{ex_id}: expected its stub"
    rope_stubs = [EXERCISE_STUB.search(body[-1])[2] for body in region_bodies(handout)["rope"]]
    assert rope_stubs == [" (RotaryEmbedding.forward)", " (rotate_half)", " (apply_rope)"], \
        f"each stub names the function it stands in: expected RotaryEmbedding.forward, rotate_half, apply_rope, got {rope_stubs}"
    assert with_bodies(handout, region_bodies(reference)) == reference, "the reference bodies pasted back must restore it"


def test_isolated_grading_fails_exactly_the_exercises_with_a_classic_mistake_and_names_it(grading_jobs):
    """Each mistake fails only its own exercise (not lfp_layer, which uses rope, select, ...), and
    the message says which mistake it is."""
    skip_if_stubs_left()
    rows = grading_jobs[planted_mistakes_graded_in_isolation].result()
    for row in rows:
        if row["exercise"] in PLANTED:
            assert row["status"] == "failed" and PLANTED[row["exercise"]][2] in row["first_failure"], row
        else:
            assert row["status"] == "passed", row


def test_grade_prints_one_row_per_exercise_then_one_json_line(capsys):
    rows = [{"exercise": ex, "status": "passed", "passed": 1, "total": 1, "first_failure": ""} for ex in EXERCISES]
    rows[1].update(status="failed", passed=0, first_failure="exercise rope: apply_rope\n  likely mistake: X")
    table = format_grade(rows).split("\n")
    assert table[0].split() == ["exercise", "status", "tests", "first", "failure"]
    assert table[2].split()[:4] == ["rope", "failed", "0/1", "exercise"] and table[3].strip() == "likely mistake: X"
    assert main(["exercises"]) == 0
    listed = capsys.readouterr().out.split("\n")[1:-1]
    assert [line.split()[0] for line in listed] == list(EXERCISES)

# Every test runs inside stubs_block (see `graded`), so that in a handout an exercise not yet

# Every test runs inside stubs_block (see course.graded): in a handout, an exercise not yet written
# skips the tests it blocks instead of failing them.
course.wrap_tests(globals())
