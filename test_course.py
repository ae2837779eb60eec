"""Executable claims about course.py: exercise regions, handouts without solutions, grading one
copy and a class."""

import ast
import concurrent.futures
import csv
import inspect
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import cogvla_mini as cm
import course
import test_cogvla_mini
from course import (HERE, GradingError, UsageError, find_regions, format_grade, grade, grade_class, main,
                    make_handout, region_bodies, with_bodies)
from exercises import CALLS, EXERCISE_STUB, EXERCISES, cases_of, exercise_tests


# ----------------------------------------------------------------------------- the exercises and their tests

def test_every_exercise_has_regions_and_tests_and_dash_k_picks_only_its_own():
    regions = region_bodies(open(cm.__file__).read())
    assert set(regions) == set(EXERCISES), f"exercises without a region: {sorted(set(EXERCISES) - set(regions))}"
    count = dict.fromkeys(EXERCISES, 0)
    tags = {test.__name__: ex for ex, test in exercise_tests(test_cogvla_mini)}
    assert set(tags.values()) <= set(EXERCISES), f"unknown exercise marks: {set(tags.values()) - set(EXERCISES)}"
    for name, test in vars(test_cogvla_mini).items():
        if not name.startswith("test_"):
            continue
        tag = tags.get(name)
        count[tag] = count.get(tag, 0) + 1
        for ex_id in EXERCISES:   # `pytest -k <id>` matches names: an exercise id only in its own tests' names
            assert ex_id not in name or tag == ex_id, f"{name} contains {ex_id!r} but is tagged {tag!r}: rename it"
    assert all(count[ex_id] for ex_id in EXERCISES), f"exercises without tests: {[e for e in EXERCISES if not count[e]]}"


def test_every_exercise_test_builds_cases_a_handout_can_store():
    """Each @exercise test returns cases: a call that exists, its inputs, an expected value for
    every output, and classic mistakes whose outputs differ from the expected ones (a mistake
    that gives the right answer names nothing)."""
    tests = exercise_tests(test_cogvla_mini)
    assert {ex for ex, _ in tests} == set(EXERCISES)
    for ex, test in tests:
        for case in cases_of(ex, test):
            where = f"{case.test}: {case.what}"
            assert case.exercise == ex and CALLS.get(case.call.__name__) is case.call, where
            assert set(inspect.signature(case.call).parameters) - {"cm"} == set(case.inputs), where
            assert case.raises or (case.want and set(case.tol) == set(case.want)), where
            for name, outputs in case.mistakes.items():
                for out, value in outputs.items():
                    wrong, want = (value() if callable(value) else value), case.want[out]
                    assert wrong.shape != want.shape or not torch.equal(wrong.double(), want.double()), \
                        f"{where}: the mistake '{name}' gives the expected {out}"


def test_the_projects_imports_run_one_way():
    """The textbook at the bottom, exercises.py above it, the tests and the instructor's tools on
    top: no file imports one that (through others) imports it. Dynamic imports by name count."""
    files = {p.stem: p for p in HERE.glob("*.py")}
    imports = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                found.add(node.args[0].value)
        imports[name] = found & set(files) - {name}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in imports[start])
    assert imports["cogvla_mini"] == set() and imports["exercises"] == set(), imports
    circles = sorted(f"{a} -> {b}" for a in imports for b in imports[a] if reaches(b, a))
    assert not circles, f"import circles: {circles}"
    assert "course" not in {m for name, found in imports.items() if name != "test_course" for m in found}


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


def test_grade_prints_one_row_per_exercise_with_points_then_one_json_line(capsys):
    rows = [{"exercise": ex, "status": "passed", "passed": 1, "total": 1, "first_failure": "", "points": 10,
             "points_possible": 10} for ex in ("rmsnorm", "rope")]
    rows[1].update(status="failed", passed=0, points=0, first_failure="exercise rope: apply_rope\n  likely mistake: X")
    table = format_grade(rows).split("\n")
    assert table[0].split() == ["exercise", "status", "tests", "points", "first", "failure"]
    assert table[1].split() == ["rmsnorm", "passed", "1/1", "10/10"]
    assert table[2].split()[:5] == ["rope", "failed", "0/1", "0/10", "exercise"] and table[3].strip() == "likely mistake: X"
    assert main(["exercises"]) == 0
    listed = capsys.readouterr().out.split("\n")[1:-1]
    assert [(line.split()[0], int(line.split()[1])) for line in listed] == [(e, x.points) for e, x in EXERCISES.items()]


# ----------------------------------------------------------------------------- handouts

def test_handout_refuses_unknown_ids_a_used_folder_and_broken_markers_writing_nothing(tmp_path, capsys):
    assert main(["handout", "--exercises", "rope,nope", "--out", str(tmp_path / "a")]) == 2
    assert "--exercises: unknown exercise(s) nope" in capsys.readouterr().err and not (tmp_path / "a").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="exists and is not an empty directory; nothing written"):
        make_handout(["rope"], used)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
    project = tmp_path / "project"
    shutil.copytree(HERE, project, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache"))
    source = (project / "cogvla_mini.py").read_text()
    (project / "cogvla_mini.py").write_text(source.replace("    # --- exercise select ---",
                                                          "    # --- exercise select ---\n    # --- exercise rope ---", 1))
    with pytest.raises(ValueError, match="begins inside exercise select .* regions do not nest"):
        make_handout(["rope"], tmp_path / "b", project)
    assert not (tmp_path / "b").exists()
    (project / "cogvla_mini.py").write_text(source)            # a file that quotes a solution line
    (project / "docs" / "notes.md").write_text("For select, write:\n    return idx.sort(dim=-1).values\n")
    with pytest.raises(ValueError, match="(?s)lines of the solution appear in the handout.*docs/notes.md: return idx.sort"):
        make_handout(["select"], tmp_path / "c", project, log=lambda *_: None)
    assert not (tmp_path / "c").exists()


def handout_of_all(folder):
    """make_handout grades its own output twice (the stubs: 'not started'; the reference pasted
    back: 'passed'), with the handout's own stored checks, and writes nothing otherwise."""
    return make_handout(list(EXERCISES), folder / "handout", log=lambda *_: None), folder / "handout"


def isolated(folder, text, exercises=None, name="student"):
    """A student's copy holding `text` as its cogvla_mini.py, graded with --isolate."""
    student = folder / name
    student.mkdir()
    (student / "cogvla_mini.py").write_text(text)
    return grade(student, HERE, exercises or list(EXERCISES), log=lambda *_: None)


MISTAKES = {   # exercise: (a line of the reference, what a student wrote instead, what `grade` must say)
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


def with_mistakes(mistakes, text=None):
    """The reference's cogvla_mini.py with each (right, wrong) of `mistakes` made in its exercise's regions."""
    text = text or (HERE / "cogvla_mini.py").read_text()
    for ex_id, (right, wrong, *_) in mistakes.items():
        bodies = ["\n".join(body) for body in region_bodies(text)[ex_id]]
        assert sum(b.count(right) for b in bodies) == 1, f"{ex_id}: expected {right!r} once in its regions"
        text = with_bodies(text, {ex_id: [b.replace(right, wrong).split("\n") for b in bodies]})[0]
    return text


def planted_mistakes_graded_in_isolation(folder):
    """All seven mistakes in one student's file, graded with --isolate."""
    return isolated(folder, with_mistakes(MISTAKES))


# A student who wants full marks without solving: from inside two exercise bodies, one reaches
# every comparison function it can find in its process and makes it agree, the other returns a
# tensor that compares equal to anything. Each returns a wrong answer.
CHEATS = {
    "select": ("    return idx.sort(dim=-1).values", """\
    import sys
    for module in list(sys.modules.values()):
        for name in ("assert_close", "compare", "compare_error", "check", "verdict", "grade_rows"):
            if name in vars(module):
                setattr(module, name, lambda *args, **kwargs: None)
    return keep_prob.topk(k).indices"""),
    "swiglu": ("        return self.down_proj(", """\
        class Agreeable(torch.Tensor):
            def __sub__(self, other):
                return torch.zeros_like(other)
            __rsub__ = __sub__
            def __eq__(self, other):
                return torch.ones_like(other, dtype=torch.bool)
        return torch.zeros_like(x).as_subclass(Agreeable)
        return self.down_proj("""),
}


def a_cheat_graded_with_isolate(folder):
    """The rows of the cheating student's copy graded with --isolate (and an exercise left as the
    reference's)."""
    return isolated(folder, with_mistakes(CHEATS), ["swiglu", "select", "rmsnorm"])


# A class of three exercises, and one submission of each kind a class produces.
CLASS_EXERCISES = ["swiglu", "select", "gather_scatter"]
ENDLESS = "        while True:\n            pass\n"


def a_class(folder):
    """(gradebook rows, the CSV's rows, the log lines, the submissions' folder) of a class graded
    with --class: full marks, one mistake, the cheat, an error, and five that cannot be graded
    as a whole."""
    reference = (HERE / "cogvla_mini.py").read_text()
    subs = folder / "submissions"
    texts = {
        "ada": reference,                                                    # full marks
        "bo": with_mistakes({"select": MISTAKES["select"]}, reference),      # one classic mistake
        "cy": reference.replace("    # --- exercise select ---\n", "    # --- exercise select ---\n    x = (\n"),
        "dee": with_mistakes({"swiglu": ("        return self.down_proj(", ENDLESS + "        return self.down_proj(")}),
        "eve": with_mistakes({"swiglu": ("        return self.down_proj(",
                                         "        import os\n        os._exit(3)\n        return self.down_proj(")}),
        "fay": reference.replace("    # --- exercise select ---\n", "", 1),   # a marker line deleted
        "gus": with_mistakes({"gather_scatter": ("    return x[batch, idx]", "    raise RuntimeError('boom')")}),
        "hal": None,                                                          # cogvla_mini.py missing
        "ivy": with_mistakes(CHEATS),
    }
    for name, text in texts.items():
        (subs / name).mkdir(parents=True)
        (subs / name / "handout.json").write_text(json.dumps({"exercises": CLASS_EXERCISES}))
        if text is not None:
            (subs / name / "cogvla_mini.py").write_text(text)
    lines = []
    book = grade_class(subs, HERE, csv_path=folder / "grades.csv", time_limit=2, log=lines.append)
    with open(folder / "grades.csv", newline="") as f:
        table = list(csv.reader(f))
    return book, table, lines, subs


GRADESCOPE_EXERCISES = ["swiglu", "select"]


def gradescope_results(folder):
    """Gradescope's results.json of a two-exercise handout graded as handed out, and again with
    the reference's code pasted back."""
    make_handout(GRADESCOPE_EXERCISES, folder / "handout", log=lambda *_: None)
    results = []
    for text in ((folder / "handout" / "cogvla_mini.py").read_text(), (HERE / "cogvla_mini.py").read_text()):
        (folder / "handout" / "cogvla_mini.py").write_text(text)
        main(["grade", str(folder / "handout"), "--gradescope", str(folder / "results.json")])
        results.append(json.loads((folder / "results.json").read_text()))
    return results


# Each job grades copies of the project in processes of their own, on one thread. The first test
# that needs one starts them all, two at a time, side by side on the two cores.
GRADING_JOBS = {   # the test that needs it: the job
    "test_a_handout_holds_no_solution_and_grades_not_started_then_passed_with_the_reference_pasted_back":
        handout_of_all,
    "test_in_a_handout_pytest_fails_an_exercise_not_started_and_skips_what_it_blocks": handout_of_all,
    "test_isolated_grading_fails_exactly_the_exercises_with_a_classic_mistake_and_names_it":
        planted_mistakes_graded_in_isolation,
    "test_a_class_is_graded_one_row_per_submission_each_broken_one_with_its_reason": a_class,
    "test_code_in_an_exercise_body_cannot_change_its_grade_under_isolate_or_class": a_cheat_graded_with_isolate,
    "test_gradescope_results_score_0_as_handed_out_and_full_marks_with_the_reference": gradescope_results}


@pytest.fixture(scope="session")
def grading_jobs(request, tmp_path_factory):
    selected = {getattr(item, "originalname", item.name) for item in request.session.items}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield {job: pool.submit(job, tmp_path_factory.mktemp("grading"))
               for job in dict.fromkeys(job for test, job in GRADING_JOBS.items() if test in selected)}


def test_a_handout_holds_no_solution_and_grades_not_started_then_passed_with_the_reference_pasted_back(grading_jobs):
    (stubbed, pasted_back), out = grading_jobs[handout_of_all].result()
    assert [(r["exercise"], r["status"]) for r in stubbed] == [(ex, "not started") for ex in EXERCISES]
    assert [(r["exercise"], r["status"]) for r in pasted_back] == [(ex, "passed") for ex in EXERCISES]
    assert all(r["total"] > 0 for r in stubbed)
    assert not (out / "test_cogvla_mini.py").exists(), "the instructor's tests hold the references"
    assert json.loads((out / "handout.json").read_text())["exercises"] == list(EXERCISES)
    reference, handout = (HERE / "cogvla_mini.py").read_text(), (out / "cogvla_mini.py").read_text()
    # No solution in any file: no line of an exercise's region, nor of the naive references.
    naive = [line for name, f in vars(test_cogvla_mini).items() if name.startswith("ref_")
             for line in inspect.getsource(f).split("\n")[1:]]
    texts = {p.name: p.read_text() for p in out.rglob("*") if p.is_file() and p.suffix != ".pt"}
    for ex_id, bodies in region_bodies(reference).items():
        code = {re.sub(r"(^|\s+)#.*$", "", l).strip() for body in bodies for l in body}   # without comments
        statements = {c for c in code if len(re.findall(r"[([{]", c)) == len(re.findall(r"[)\]}]", c))}
        for line in {line for line in statements if len(line) >= 20}:
            assert not [f for f, t in texts.items() if line in t], f"{ex_id}: {line!r} is in the handout"
    public = with_bodies(reference, {ex: [[] for _ in bodies] for ex, bodies in region_bodies(reference).items()})[0]
    for line in {l.strip() for l in naive if len(l.strip()) >= 30 and l.strip() not in public}:
        assert not [f for f, t in texts.items() if line in t], f"a naive reference's {line!r} is in the handout"
    for ex_id, bodies in region_bodies(handout).items():
        assert all(EXERCISE_STUB.search(body[-1]) and body[-1].strip().startswith("raise NotImplementedError")
                   for body in bodies), f"{ex_id}: expected its stub"
    rope_stubs = [EXERCISE_STUB.search(body[-1])[2] for body in region_bodies(handout)["rope"]]
    assert rope_stubs == [" (RotaryEmbedding.forward)", " (rotate_half)", " (apply_rope)"], \
        f"each stub names the function it stands in: expected RotaryEmbedding.forward, rotate_half, apply_rope, got {rope_stubs}"
    assert with_bodies(handout, region_bodies(reference))[0] == reference, "the reference bodies pasted back restore it"


def test_in_a_handout_pytest_fails_an_exercise_not_started_and_skips_what_it_blocks(grading_jobs):
    """A student's `pytest -k <id>` (conftest.py): the tests of an exercise not yet written fail as
    "not started", in one line; the tests of one built on it are skipped as blocked by it."""
    _, out = grading_jobs[handout_of_all].result()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k",
                          "causal_mask or lfp_layer"], cwd=out, capture_output=True, text=True, timeout=300)
    lines = run.stdout.split("\n")
    n_mask = sum(c.exercise == "causal_mask" for c in course.instructor_cases(HERE))
    not_started = "exercise causal_mask: not started (the stub in attention_mask raises NotImplementedError)"
    assert n_mask and lines.count(not_started) == n_mask, run.stdout
    # The decoder with an inf weight (lfp_layer) builds the mask before it reaches forward_lfp.
    assert re.search(r"SKIPPED \[1\] .*blocked by exercise causal_mask: attention_mask not started", run.stdout), run.stdout
    assert "Traceback" not in run.stdout and "NotImplementedError(" not in run.stdout, run.stdout


def test_isolated_grading_fails_exactly_the_exercises_with_a_classic_mistake_and_names_it(grading_jobs):
    """Each mistake fails only its own exercise (not lfp_layer, which uses rope, select, ...), and
    the message says which mistake it is."""
    rows = grading_jobs[planted_mistakes_graded_in_isolation].result()
    for row in rows:
        if row["exercise"] in MISTAKES:
            assert row["status"] == "failed" and MISTAKES[row["exercise"]][2] in row["first_failure"], row
            assert row["points"] == 0
        else:
            assert row["status"] == "passed" and row["points"] == EXERCISES[row["exercise"]].points, row


def test_a_class_is_graded_one_row_per_submission_each_broken_one_with_its_reason(grading_jobs):
    book, table, lines, subs = grading_jobs[a_class].result()
    rows = {b["student"]: b for b in book}
    total = sum(EXERCISES[ex].points for ex in CLASS_EXERCISES)
    assert table[0] == ["student", *CLASS_EXERCISES, "points", "total", "note"]
    assert [r[0] for r in table[1:]] == sorted(rows) == ["ada", "bo", "cy", "dee", "eve", "fay", "gus", "hal", "ivy"]
    assert rows["ada"]["points"] == total and rows["ada"]["note"] == ""
    assert rows["bo"]["select"] == 0 and rows["bo"]["points"] == total - EXERCISES["select"].points
    assert "top-k indices left in score order" in rows["bo"]["note"]
    reasons = {"cy": f"syntax error in {subs / 'cy' / 'cogvla_mini.py'}:",
               "fay": "no region for exercise(s) select", "hal": f"{subs / 'hal' / 'cogvla_mini.py'}: missing"}
    for student, reason in reasons.items():
        assert rows[student]["note"].startswith("not graded") and reason in rows[student]["note"], rows[student]
        assert rows[student]["points"] == 0
    # An endless loop and a crash, each in its own exercise's process, fail that exercise alone.
    for student, reason in (("dee", "did not finish within 2 s"), ("eve", "crashed (exit code 3)")):
        note = rows[student]["note"]
        assert note.startswith(f"swiglu: {subs / student / 'cogvla_mini.py'}: ") and reason in note, rows[student]
        assert rows[student]["points"] == total - EXERCISES["swiglu"].points, rows[student]
    # An error raised in the student's code is reported at the student's own file and line.
    line = next(n for n, l in enumerate((subs / "gus" / "cogvla_mini.py").read_text().split("\n"), 1) if "'boom'" in l)
    assert f"boom (at {subs / 'gus' / 'cogvla_mini.py'}:{line})" in rows["gus"]["note"], rows["gus"]
    assert rows["gus"]["points"] == total - EXERCISES["gather_scatter"].points
    assert [l.split(":")[0] for l in lines[1:-1]] == [f"[{i}/9] {s}" for i, s in enumerate(sorted(rows), 1)]
    assert lines[-1].startswith("graded 6 of 9 submissions") and "1 full marks" in lines[-1]


def test_code_in_an_exercise_body_cannot_change_its_grade_under_isolate_or_class(grading_jobs):
    """The two cheats (CHEATS) get 0 points, under --isolate and in a class; the exercise beside
    them that the student left as the reference's gets its points."""
    rows = {r["exercise"]: r for r in grading_jobs[a_cheat_graded_with_isolate].result()}
    assert rows["select"]["points"] == 0 and rows["swiglu"]["points"] == 0, rows
    assert all("largest difference" in rows[ex]["first_failure"] for ex in CHEATS), rows   # wrong values, compared
    assert rows["rmsnorm"]["points"] == EXERCISES["rmsnorm"].points, rows["rmsnorm"]
    book = {b["student"]: b for b in grading_jobs[a_class].result()[0]}
    assert book["ivy"]["select"] == 0 and book["ivy"]["swiglu"] == 0, book["ivy"]
    assert book["ivy"]["points"] == EXERCISES["gather_scatter"].points, book["ivy"]


def test_gradescope_results_score_0_as_handed_out_and_full_marks_with_the_reference(grading_jobs):
    handed_out, pasted_back = grading_jobs[gradescope_results].result()
    full = sum(EXERCISES[ex].points for ex in GRADESCOPE_EXERCISES)
    for results, score in ((handed_out, 0), (pasted_back, full)):
        assert results["score"] == score and sum(t["score"] for t in results["tests"]) == score, results
        assert [(t["name"], t["max_score"]) for t in results["tests"]] == [
            (ex, EXERCISES[ex].points) for ex in GRADESCOPE_EXERCISES], results
        assert all(isinstance(t["output"], str) and t["output"] for t in results["tests"]), results
    assert all("not started" in t["output"] for t in handed_out["tests"]), handed_out


# ----------------------------------------------------------------------------- grading one copy

def a_student(tmp_path, exercises, text=None, name="student"):
    """A copy of the project as a student hands it in: assigned `exercises` (handout.json)."""
    student = tmp_path / name
    student.mkdir()
    (student / "cogvla_mini.py").write_text(text or (HERE / "cogvla_mini.py").read_text())
    (student / "handout.json").write_text(json.dumps({"exercises": exercises}))
    return student


def test_grade_counts_only_what_was_assigned_and_blames_a_failed_dependency(tmp_path, capsys):
    right = a_student(tmp_path, ["rmsnorm", "lfp_layer"], name="right")
    assert main(["grade", str(right)]) == 0
    out = capsys.readouterr().out.split("\n")
    summary = json.loads(out[-2])
    assert [r["exercise"] for r in summary["exercises"]] == ["rmsnorm", "lfp_layer"]
    assert (summary["passed"], summary["total"], summary["points"], summary["points_possible"]) == (2, 2, 50, 50)
    # rmsnorm with a sum: its own failure, and lfp_layer (which runs it) blocked by it, not failed.
    wrong = a_student(tmp_path, ["rmsnorm", "lfp_layer"], with_mistakes(
        {"rmsnorm": ("x32.pow(2).mean(-1, keepdim=True)", "x32.pow(2).sum(-1, keepdim=True)")}), name="wrong")
    assert main(["grade", str(wrong)]) == 1
    rows = json.loads(capsys.readouterr().out.split("\n")[-2])["exercises"]
    assert rows[0]["status"] == "failed" and "likely mistake: a sum of squares" in rows[0]["first_failure"]
    assert rows[1]["status"] == "blocked" and rows[1]["first_failure"].startswith("blocked by exercise rmsnorm")
    assert [r["points"] for r in rows] == [0, 0]


def test_grade_usage_errors_name_the_argument(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for argv, message in (
            (["grade", str(tmp_path / "nowhere")], f"grade: DIR {tmp_path / 'nowhere'}: no such folder"),
            (["grade", str(tmp_path / "a_file")], "a file, expected a folder holding cogvla_mini.py"),
            (["grade", str(tmp_path)], "no handout.json, which says what was assigned; give --exercises"),
            (["grade", str(tmp_path), "--exercises", "rope,nope"], "--exercises: unknown exercise(s) nope"),
            (["grade", "--class", str(tmp_path / "nowhere")], "grade --class"),
            (["grade", "--class", str(tmp_path), "--isolate", str(tmp_path)], "leave out DIR and --isolate")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
        assert "Traceback" not in err


def test_grade_with_the_folders_the_wrong_way_round_is_refused(tmp_path, capsys):
    """--isolate REFERENCE STUDENT: a reference that does not pass itself (here a handout's stubs)
    would grade the reference's regions as the student's."""
    student = a_student(tmp_path, ["swiglu"])
    stubbed = a_student(tmp_path, ["swiglu"], with_bodies(student.joinpath("cogvla_mini.py").read_text(),
                        course.stub_bodies(student.joinpath("cogvla_mini.py").read_text(), ["swiglu"]))[0], "stubbed")
    assert main(["grade", "--isolate", str(stubbed), str(student)]) == 2
    err = capsys.readouterr().err
    assert f"--isolate REFERENCE {stubbed}: its own code does not pass (swiglu: not started)" in err
    assert "the wrong way round" in err


def test_a_syntax_error_is_one_message_with_the_students_path(tmp_path, capsys):
    text = (HERE / "cogvla_mini.py").read_text().replace("def select(", "def select(:", 1)
    student = a_student(tmp_path, ["select", "swiglu"], text)
    line = text.split("\n").index(next(l for l in text.split("\n") if "def select(:" in l)) + 1
    with pytest.raises(GradingError, match=f"^syntax error in {student / 'cogvla_mini.py'}:{line}: "):
        grade(student, HERE, log=lambda *_: None)
    assert main(["grade", str(student)]) == 1
    err = capsys.readouterr().err
    assert err.count("syntax error") == 1 and str(student / "cogvla_mini.py") in err

