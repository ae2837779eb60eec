"""Course exercises cut from cogvla_mini.py: handouts without solutions, and grading.

    python course.py exercises                                   the exercises, their points
    python course.py handout --exercises rope,select --out hw1   a student's copy
    python course.py grade hw1                                   grade one copy (what it assigns)
    python course.py grade --isolate REFERENCE hw1               each exercise on its own
    python course.py grade --class submissions --csv grades.csv  every copy under a folder

In cogvla_mini.py a line `# --- exercise <id> ---` marks a region: from there to the end of its
block. A handout replaces the chosen regions with stubs and carries, instead of tests with the
solutions in them, `test_exercises.py` and `exercises.pt`: the inputs of every check, the
reference's outputs and the outputs of the classic mistakes, made at handout time. A grade runs
the student's code in a process of its own that only hands back outputs; this one compares them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import importlib
import json
import math
import multiprocessing
import re
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from exercises import (EXERCISES, Case, cases_of, compare, compare_error, exercise_tests, hand_back_outputs,
                       load_cases, save_cases, stub_outcome)

HERE = Path(__file__).resolve().parent


# %% Choosing exercises ========================================================================

def parse_exercise_ids(spec, option="--exercises"):
    ids = list(EXERCISES) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [i for i in ids if i not in EXERCISES]
    if unknown or not ids:
        raise UsageError(f"{option}: unknown exercise(s) {', '.join(unknown) or '(none given)'}; "
                         f"expected 'all' or ids separated by commas, from: {', '.join(EXERCISES)}")
    return list(dict.fromkeys(ids))


class UsageError(ValueError):
    """A command given the wrong arguments: the message names the argument."""


# %% The handout's tests: the stored cases, run on the student's cogvla_mini.py ================

STUDENT_TESTS = '''"""Your exercises' checks: `python -m pytest -k <id>` runs one exercise's, `python course.py
grade` all of them, with points. Each runs your code on inputs stored in exercises.pt and compares
the result with the reference's output stored beside them (made when the handout was made)."""

from pathlib import Path

import pytest

import exercises

CASES = exercises.load_cases(Path(__file__).parent / "exercises.pt")


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.exercise(c.exercise),
                                               id=f"{c.exercise}-{c.test.removeprefix('test_')}-{i}")
                                  for i, c in enumerate(CASES)])
def test_exercise(case, check):
    check(case)
'''


def stubs_in(text):
    return sorted(set(re.findall(r'raise NotImplementedError\("exercise (\w+): not started', text)))


# %% Regions: one marker line, to the end of its block =========================================

MARKER = re.compile(r"^(?P<indent>[ \t]*)# --- exercise (?P<id>\w+) ---$")
STUB_RAISE = ('raise NotImplementedError("exercise {id}: not started ({where}); '
              'check it with: python -m pytest -k {id}")')


@dataclasses.dataclass
class Region:
    exercise: str
    begin: int      # line index (from 0) of its marker
    end: int        # line index just after its last line
    indent: str     # the marker's indentation, which the body shares


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
                end = j + 1              # the block's last line; blank lines after it left out
        if end == i + 1:
            raise ValueError(f"{where}:{i + 1}: exercise {m['id']}: no code follows the marker at "
                             f"its indentation")
        regions.append(Region(m["id"], i, end, m["indent"]))
    return regions


def region_bodies(text, where="cogvla_mini.py"):
    """{exercise: [the lines of its first region, its second, ...]}"""
    lines = text.split("\n")
    bodies = {}
    for r in find_regions(text, where):
        bodies.setdefault(r.exercise, []).append(lines[r.begin + 1:r.end])
    return bodies


def with_bodies(text, new, where="cogvla_mini.py"):
    """`text` with the regions of each exercise in `new` ({exercise: [body per region]})
    replaced -> (the new text, {line of the new text: (where its lines came from, line there)}
    for the replaced lines, 1-based, so that an error's file:line can point at the student's)."""
    lines, out, pos, count, origin = text.split("\n"), [], 0, {}, {}
    regions = find_regions(text, where)
    for ex, bodies in new.items():
        have = sum(r.exercise == ex for r in regions)
        if have != len(bodies):
            raise ValueError(f"{where}: exercise {ex} has {have} region(s), the replacement {len(bodies)}")
    for r in regions:
        if r.exercise in new:
            k = count[r.exercise] = count.get(r.exercise, -1) + 1
            out += lines[pos:r.begin + 1]
            body = new[r.exercise][k]
            for j, line in enumerate(body):
                origin[len(out) + 1 + j] = line        # filled in by the caller with a location
            out += [line.text if isinstance(line, SourceLine) else line for line in body]
            pos = r.end
    return "\n".join(out + lines[pos:]), {n: line.at for n, line in origin.items()
                                          if isinstance(line, SourceLine)}


@dataclasses.dataclass
class SourceLine:
    """A line of code that remembers where it came from: (path, line number)."""
    text: str
    at: tuple


def located_bodies(text, path):
    """region_bodies, each line a SourceLine that knows its place in `path`."""
    lines = text.split("\n")
    bodies = {}
    for r in find_regions(text, str(path)):
        bodies.setdefault(r.exercise, []).append(
            [SourceLine(lines[i], (str(path), i + 1)) for i in range(r.begin + 1, r.end)])
    return bodies


def enclosing_function(lines, i):
    """The name of the def (with its class, if any) that line i sits in: `Router.forward`."""
    names, indent = [], len(lines[i]) - len(lines[i].lstrip())
    for line in reversed(lines[:i]):
        m = re.match(r"(\s*)(?:def|class) (\w+)", line)
        if m and len(m[1]) < indent:
            names.insert(0, m[2])
            indent = len(m[1])
    return ".".join(names)


def stub_bodies(text, ids):
    """{exercise: [stub per region]}: the statement, the hint and the NotImplementedError."""
    lines, regions = text.split("\n"), find_regions(text)
    stubs = {}
    for ex_id in ids:
        mine = [r for r in regions if r.exercise == ex_id]
        for k, r in enumerate(mine):
            ex, width = EXERCISES[ex_id], 100 - len(r.indent) - 2
            where = enclosing_function(lines, r.begin)
            head = f"Exercise {ex_id}" + (f", part {k + 1} of {len(mine)} ({where})" if len(mine) > 1 else "")
            comment = textwrap.wrap(f"{head}: {ex.statement}", width) + textwrap.wrap(f"Hint: {ex.hint}", width)
            stubs.setdefault(ex_id, []).append([f"{r.indent}# {c}" for c in comment]
                                               + [r.indent + STUB_RAISE.format(id=ex_id, where=where)])
    return stubs


# %% Handouts ==================================================================================

# What a handout carries besides the stubbed cogvla_mini.py. Not the instructor's tests: they hold
# the naive reference of every exercise.
HANDOUT_FILES = (".gitignore", "README.md", "bench.py", "conftest.py", "course.py", "exercises.py",
                 "pytest.ini", "requirements.txt", "train_toy.py")


def make_handout(ids, out, project=HERE, log=print):
    """Write a student's copy to `out`: the chosen regions stubbed, the tests as stored cases
    (exercises.pt, test_exercises.py), and the assignment (handout.json). It checks itself
    first and writes nothing if a check fails."""
    out, project = Path(out), Path(project)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not an empty directory; nothing written")
    source = (project / "cogvla_mini.py").read_text()
    bodies = region_bodies(source)
    if missing := [i for i in ids if i not in bodies]:
        raise ValueError(f"{project / 'cogvla_mini.py'}: no region for exercise(s) {', '.join(missing)}")
    stubbed, _ = with_bodies(source, stub_bodies(source, ids))
    log(f"making the stored checks of {len(ids)} exercise(s) from the reference ...")
    cases = [case for case in instructor_cases(project) if case.exercise in ids]
    with tempfile.TemporaryDirectory() as tmp:
        draft = Path(tmp) / "handout"
        draft.mkdir()
        for name in HANDOUT_FILES:
            shutil.copy2(project / name, draft / name)
        if (project / "docs").is_dir():
            shutil.copytree(project / "docs", draft / "docs")
        (draft / "cogvla_mini.py").write_text(stubbed)
        (draft / "test_exercises.py").write_text(STUDENT_TESTS)
        save_cases(cases, draft / "exercises.pt")
        manifest = {"exercises": ids, "points": {ex: EXERCISES[ex].points for ex in ids}}
        (draft / "handout.json").write_text(json.dumps(manifest, indent=1) + "\n")
        checks = check_handout(draft, ids, source, project, log)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(draft, out, dirs_exist_ok=True)
    log(f"handout written to {out}: {len(ids)} exercise(s) ({', '.join(ids)}); students check one "
        f"with `python -m pytest -k <id>`, all with `python course.py grade`")
    return checks


@functools.cache
def instructor_cases(project=HERE) -> list[Case]:
    """The cases of every exercise test in the instructor's test file in `project`, built here:
    the expected outputs come from its naive references, never from a student's code."""
    if not (Path(project) / "test_cogvla_mini.py").exists():
        raise UsageError(f"{project} has no test_cogvla_mini.py: handouts and grades are made from "
                         f"the instructor's copy of the project, which holds the references")
    if str(project) not in sys.path:
        sys.path.insert(0, str(project))
    tests = exercise_tests(importlib.import_module("test_cogvla_mini"))
    return [case for ex, test in tests for case in cases_of(ex, test)]


def leaked_lines(folder, lines):
    """[(file, line)] for each line of code in `lines` found in a text file of `folder`, on a line
    of its own or inside another (a hint quoting it). Only whole statements of 20 characters or
    more count, without their comments: `else:` or `dtype=torch.float32)` give nothing away."""
    code = {re.sub(r"(^|\s+)#.*$", "", line).strip() for line in lines}     # without comments

    def whole(line):       # not the tail of a statement begun on the line before
        return sum(line.count(c) for c in "([{") == sum(line.count(c) for c in ")]}")
    telling = {line for line in code if len(line) >= 20 and whole(line)}
    found = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix != ".pt"):
        text = path.read_text(errors="replace")
        found += [(str(path.relative_to(folder)), line) for line in sorted(telling) if line in text]
    return found


def check_handout(draft, ids, source, project, log):
    """The handout's own checks; ValueError (and nothing written) on the first that fails."""
    text = (draft / "cogvla_mini.py").read_text()
    if [r.exercise for r in find_regions(text)] != [r.exercise for r in find_regions(source)]:
        raise ValueError("handout check: the stubbed file's regions differ from the reference's; "
                         "nothing written")
    log("handout check 1/3: markers well formed; no line of a chosen exercise left in any file ...")
    bodies = region_bodies(source)
    solution = [line for ex in ids for b in bodies[ex] for line in b]
    # A line that the code a student gets anyway also holds (outside the chosen regions) gives
    # nothing away.
    public = with_bodies(source, {ex: [[] for _ in bodies[ex]] for ex in ids})[0]
    if leaks := [(f, line) for f, line in leaked_lines(draft, solution) if line not in public]:
        raise ValueError("handout check: lines of the solution appear in the handout; nothing written\n"
                         + "\n".join(f"  {file}: {line}" for file, line in leaks))
    log("handout check 2/3: graded as it is, every chosen exercise is 'not started' ...")
    stubbed = grade(draft, log=lambda *_: None, stored_checks=True)
    if wrong := [r for r in stubbed if r["status"] != "not started" or r["total"] == 0]:
        raise ValueError("handout check: grading the handout gave\n" + format_grade(wrong)
                         + "\nnothing written")
    log("handout check 3/3: with the reference's code pasted back, every chosen exercise passes ...")
    back = Path(str(draft) + "-back")
    shutil.copytree(draft, back)
    (back / "cogvla_mini.py").write_text(source)
    pasted_back = grade(back, log=lambda *_: None, stored_checks=True)
    shutil.rmtree(back)
    if wrong := [r for r in pasted_back if r["status"] != "passed"]:
        raise ValueError("handout check: the reference itself fails the stored checks\n"
                         + format_grade(wrong) + "\nnothing written")
    return stubbed, pasted_back


# %% Grading ===================================================================================
# The student's code runs in a process of its own that only computes outputs for given inputs
# (exercises.hand_back_outputs); this process, which never imports it, compares them.

GRADING_TIME_LIMIT = 600   # s, per grading process; an endless loop in a student's code ends here


class GradingError(RuntimeError):
    """A submission, or one exercise's run, that cannot be graded (a syntax error, a missing file
    or marker, a crash, a time-out, outputs that are not plain data): the message says why."""


def submission_folder(path, option):
    """The folder `path` as given for `option`, or a UsageError saying what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{option} {path}: no such folder")
    if not path.is_dir():
        raise UsageError(f"{option} {path}: a file, expected a folder holding cogvla_mini.py")
    return path


def assigned(folder, exercises=None):
    """The exercises to grade: `exercises`, or else those that the folder's handout.json assigns."""
    if exercises:
        return exercises
    manifest = Path(folder) / "handout.json"
    if not manifest.exists():
        raise UsageError(f"{folder}: no handout.json, which says what was assigned; give --exercises")
    return parse_exercise_ids(",".join(json.loads(manifest.read_text())["exercises"]),
                              f"{manifest}: exercises")


def student_source(folder):
    """The student's cogvla_mini.py, read and compiled: GradingError with its path if it is
    missing or does not parse."""
    path = Path(folder) / "cogvla_mini.py"
    if not path.exists():
        raise GradingError(f"{path}: missing")
    text = path.read_text(errors="replace")
    try:
        compile(text, str(path), "exec")
    except SyntaxError as err:
        raise GradingError(f"syntax error in {path}:{err.lineno}: {err.msg}") from None
    return path, text


def grade(student, reference=None, exercises=None, time_limit=GRADING_TIME_LIMIT, log=print,
          stored_checks=None):
    """One row per assigned exercise: status, tests passed of total, points, the first failure's
    message. The cases are the instructor's tests', when this copy of course.py has them, or else
    (`stored_checks`) the handout's own. With a `reference` folder, each exercise runs, in a
    process of its own, on the reference's cogvla_mini.py with only that exercise's regions taken
    from the student's, so one mistake does not fail every exercise built on it; without, all
    run on the student's file in one process, and an exercise whose dependency failed is
    "blocked by" it."""
    student = submission_folder(student, "grade: DIR")
    ids = assigned(student, exercises)
    path, mine = student_source(student)
    if (HERE / "test_cogvla_mini.py").exists() if stored_checks is None else not stored_checks:
        cases = instructor_cases(HERE)
    elif not (student / "exercises.pt").exists():
        raise GradingError(f"{student / 'exercises.pt'}: missing (the handout's checks)")
    else:
        cases = load_cases(student / "exercises.pt")
    cases = [c for c in cases if c.exercise in ids]
    if reference is None:      # one run: the student's file, origin: each line its own
        runs = {None: (mine, {n: (str(path), n) for n in range(1, mine.count("\n") + 2)})}
    else:                      # a run per exercise: the reference with that exercise's regions
        theirs = (Path(reference) / "cogvla_mini.py").read_text()
        bodies = located_bodies(mine, path)
        if absent := [ex for ex in ids if ex not in bodies]:
            raise GradingError(f"{path}: no region for exercise(s) {', '.join(absent)}: its "
                               f"'# --- exercise <id> ---' marker line must stay")
        runs = {ex: with_bodies(theirs, {ex: bodies[ex]}) for ex in ids}
    log(f"grading {path}" + (f" in isolation against {reference}" if reference else "")
        + f": {len(ids)} exercise(s) ...")
    tests = {}    # test -> its exercise, and the first case that did not pass: (outcome, message)
    for ex, (text, origin) in runs.items():
        mine_here = [case for case in cases if ex in (None, case.exercise)]
        try:
            verdicts = [verdict(case, record) for case, record in
                        zip(mine_here, outputs_of(text, mine_here, time_limit, path))]
        except GradingError as err:          # a crash or a time-out fails each case of that run
            verdicts = [("failed", str(err))] * len(mine_here)
        for case, (outcome, message) in zip(mine_here, verdicts):
            test = tests.setdefault(case.test, {"exercise": case.exercise, "outcome": "passed", "message": ""})
            if test["outcome"] == "passed" and outcome != "passed":
                test.update(outcome=outcome, message=relocated(message, origin, Path(reference or student)))
    return grade_rows(list(tests.values()), ids, stubs_in(mine), blocking=reference is None)


# A grading process starts as a copy of a server process that has imported torch and nothing of
# the student's (the standard library's forkserver), in milliseconds instead of the ~1.5 s a
# fresh interpreter takes to import torch; where there is no fork (Windows), a fresh interpreter.
PROCESSES = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                        else "spawn")
PROCESSES.set_forkserver_preload(["torch", "exercises"])


def outputs_of(text, cases, time_limit, path):
    """Run the cases on `text` (a cogvla_mini.py) in a process of its own, which hands back what
    each call returned or raised, as tensors and strings (loaded with weights_only: nothing
    executable). GradingError if it does not finish in time, ends without its outputs, or hands
    back anything else."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "cogvla_mini.py").write_text(text)
        torch.save({"module": str(tmp / "cogvla_mini.py"),
                    "calls": [{"call": c.call.__name__, "inputs": c.inputs} for c in cases]}, tmp / "job.pt")
        job, out, log = tmp / "job.pt", tmp / "outputs.pt", tmp / "grading.log"
        process = PROCESSES.Process(target=hand_back_outputs, args=(job, out, log, time_limit), daemon=True)
        process.start()
        process.join(time_limit + 30)
        if process.is_alive():
            process.kill()
            process.join()
            raise GradingError(f"{path}: the grading run did not finish within {time_limit} s (an endless "
                               f"loop?), and did not stop itself: killed")
        printed = log.read_text(errors="replace") if log.exists() else ""
        if "Timeout (" in printed:      # faulthandler's stacks, innermost call first
            stacks = printed[printed.index("Timeout ("):].splitlines()
            raise GradingError(f"{path}: the grading run did not finish within {time_limit} s (an endless "
                               f"loop?); where it was:\n" + "\n".join(stacks[:12]))
        if process.exitcode != 0 or not out.exists():
            raise GradingError(f"{path}: the grading process crashed (exit code {process.exitcode}) before "
                               f"it handed back its outputs:\n{printed[-3000:]}")
        try:
            records = torch.load(out, weights_only=True)
        except Exception as err:
            raise GradingError(f"{path}: the grading process handed back outputs that are not plain data "
                               f"({type(err).__name__}: {str(err)[:200]})") from None
    if type(records) is not list or len(records) != len(cases):
        raise GradingError(f"{path}: the grading process handed back {type(records).__name__}, expected "
                           f"a list of {len(cases)} outputs")
    return records


def verdict(case, record):
    """(outcome, message) of one case, from what the grading process handed back for it."""
    if type(record) is not dict:
        return "failed", f"exercise {case.exercise}: {case.what}: handed back {type(record).__name__}, not outputs"
    error, message = record.get("error"), str(record.get("message", ""))
    if error == "NotImplementedError" and (stub := stub_outcome(message, case.exercise)):
        return stub
    if error is not None and not case.raises:
        return "failed", f"{error}: {message}"
    try:
        if case.raises:
            compare_error(case, error, message)
        else:
            compare(case, record.get("outputs"))
    except AssertionError as err:
        return "failed", f"exercise {case.exercise}: {err}"
    return "passed", ""


def relocated(message, origin, reference):
    """An error's 'at .../cogvla_mini.py:LINE' in the graded copy -> the student's file and line
    (`origin`), or the reference's where the line is not the student's."""
    def place(m):
        line = int(m[1])
        if line in origin:
            where, n = origin[line]
            return f"(at {where}:{n})"
        return f"(at {reference / 'cogvla_mini.py'}:{line}, the reference's code)"
    return re.sub(r"\(at \S+cogvla_mini\.py:(\d+)\)", place, message)


def grade_rows(tests, ids, stubbed, blocking=True):
    rows = {}
    for ex in ids:
        mine = [t for t in tests if t["exercise"] == ex]
        passed = sum(t["outcome"] == "passed" for t in mine)

        def first(outcome):
            """The first message of this outcome, preferring one that names a classic mistake."""
            messages = [t["message"] for t in mine if t["outcome"] == outcome]
            return next((m for m in messages if "likely mistake" in m), messages[0] if messages else "")

        if first("failed"):
            status, message = "failed", first("failed")
        elif ex in stubbed or any(t["outcome"] == "not started" for t in mine):
            status, message = "not started", first("not started") or first("blocked")
        elif any(t["outcome"] == "blocked" for t in mine):
            status, message = "blocked", first("blocked")
        elif mine and passed == len(mine):
            status, message = "passed", ""
        else:
            status, message = "failed", "no test of this exercise ran"
        rows[ex] = {"exercise": ex, "status": status, "passed": passed, "total": len(mine),
                    "first_failure": message}
    for ex, row in rows.items():     # a failure through an exercise it builds on is not its own
        upstream = [d for d in EXERCISES[ex].depends if d in rows and rows[d]["status"] != "passed"]
        if blocking and upstream and row["status"] == "failed":
            row.update(status="blocked", first_failure=f"blocked by exercise {upstream[0]} "
                       f"({rows[upstream[0]]['status']}): fix it first; then: {row['first_failure']}")
    for row in rows.values():        # an exercise's points when all its tests pass, else none
        full = EXERCISES[row["exercise"]].points
        row.update(points=full if row["status"] == "passed" else 0, points_possible=full)
    return list(rows.values())


def format_grade(rows):
    lines = [f"{'exercise':<15} {'status':<12} {'tests':>6} {'points':>7}  first failure"]
    for r in rows:
        message = r["first_failure"].split("\n")
        points = f"{r.get('points', 0):g}/{r.get('points_possible', 0)}"
        lines.append(f"{r['exercise']:<15} {r['status']:<12} {r['passed']:>3}/{r['total']:<2} "
                     f"{points:>7}  {message[0]}")
        lines += [" " * 46 + m.strip() for m in message[1:]]
    return "\n".join(lines)


def grade_summary(rows):
    return {"exercises": rows, "passed": sum(r["status"] == "passed" for r in rows),
            "total": len(rows), "points": sum(r["points"] for r in rows),
            "points_possible": sum(r["points_possible"] for r in rows)}


def write_gradescope(rows, path, note=""):
    """Gradescope's autograder results.json: the total, and a test per exercise."""
    tests = [{"name": r["exercise"], "score": r["points"], "max_score": r["points_possible"],
              "output": note or r["first_failure"] or "passed"} for r in rows]
    Path(path).write_text(json.dumps({"score": sum(r["points"] for r in rows), "tests": tests}, indent=1) + "\n")


def in_short(message):
    """A failure's first line, and the classic mistake it names, if it names one."""
    lines = re.sub(r"^exercise \w+: ", "", message).split("\n")
    mistake = [line.strip() for line in lines if line.strip().startswith("likely mistake:")]
    return " | ".join([lines[0].strip()] + mistake[:1])


def check_reference(reference, ids, log):
    """--isolate and --class take every other region from the reference: it must pass itself
    (two folders given the wrong way round would otherwise grade the reference)."""
    reference = submission_folder(reference, "--isolate REFERENCE")
    try:
        rows = grade(reference, exercises=ids, log=lambda *_: None)
    except GradingError as err:
        raise UsageError(f"--isolate REFERENCE {reference}: cannot be graded: {err}") from None
    if bad := [r for r in rows if r["status"] != "passed"]:
        raise UsageError(f"--isolate REFERENCE {reference}: its own code does not pass "
                         f"({', '.join(r['exercise'] + ': ' + r['status'] for r in bad)}); are the "
                         f"reference and the student's folder the wrong way round?")
    log(f"reference {reference}: passes its own tests of {', '.join(ids)}")
    return reference


def grade_class(folder, reference=HERE, exercises=None, csv_path=None,
                time_limit=GRADING_TIME_LIMIT, log=print):
    """Grade every submission folder under `folder`, each in a process of its own with a time
    limit, isolated against `reference`. A submission that cannot be graded is a row with its
    reason; the others are graded. Writes a CSV gradebook: student, points per exercise, points,
    total, note."""
    folder = submission_folder(folder, "grade --class")
    students = sorted(p for p in folder.iterdir() if p.is_dir())
    if not students:
        raise UsageError(f"grade --class {folder}: no submission folders in it")
    if not exercises:
        manifests = {s.name: tuple(assigned(s)) for s in students if (s / "handout.json").exists()}
        if len(set(manifests.values())) != 1:
            raise UsageError(f"grade --class {folder}: the submissions' handout.json files "
                             f"{'disagree' if manifests else 'are missing'}; give --exercises")
        exercises = list(next(iter(manifests.values())))
    check_reference(reference, exercises, log)
    book, start_time = [], time.monotonic()
    for i, student in enumerate(students, 1):
        began = time.monotonic()
        try:
            rows = grade(student, reference, exercises, time_limit, log=lambda *_: None)
            note = "; ".join(f"{r['exercise']}: {in_short(r['first_failure'])}" for r in rows
                             if r["status"] != "passed")
        except GradingError as err:
            rows, note = [], f"not graded: {str(err).splitlines()[0]}"
        points = {r["exercise"]: r["points"] for r in rows}
        book.append({"student": student.name, **{ex: points.get(ex, 0) for ex in exercises},
                     "points": sum(points.values()),
                     "total": sum(EXERCISES[ex].points for ex in exercises), "note": note})
        log(f"[{i}/{len(students)}] {student.name}: {book[-1]['points']:g}/{book[-1]['total']} points"
            f" ({time.monotonic() - began:.1f} s){'  ' + note[:100] if note else ''}")
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["student", *exercises, "points", "total", "note"])
            writer.writeheader()
            writer.writerows(book)
    graded_ = [b for b in book if not b["note"].startswith("not graded")]
    mean = sum(b["points"] for b in graded_) / len(graded_) if graded_ else math.nan
    log(f"graded {len(graded_)} of {len(book)} submissions in {time.monotonic() - start_time:.0f} s: "
        f"{sum(b['points'] == b['total'] for b in book)} full marks, mean {mean:.1f} of "
        f"{book[0]['total']} points" + (f"; gradebook {csv_path}" if csv_path else ""))
    return book


# %% The command line ==========================================================================

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python course.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("exercises", help="list the exercises: id, points, depends on, statement")
    h = sub.add_parser("handout", help="write a student's copy with the chosen exercises stubbed")
    h.add_argument("--exercises", required=True, help="'all', or ids separated by commas")
    h.add_argument("--out", required=True, help="a new or empty directory")
    g = sub.add_parser("grade", help="grade a student's copy (one row per assigned exercise, then "
                       "one JSON line), or with --class every copy under a folder")
    g.add_argument("dir", nargs="?", default=None, help="the student's folder (default: this one)")
    g.add_argument("--isolate", metavar="REFERENCE", help="the reference folder: each exercise is "
                   "graded with only its own regions from DIR and every other one from REFERENCE")
    g.add_argument("--class", dest="class_dir", metavar="FOLDER", help="grade every submission "
                   "folder under FOLDER, each isolated against --reference")
    g.add_argument("--reference", default=str(HERE), help="with --class: the reference folder "
                   "(default: this one)")
    g.add_argument("--csv", help="with --class: write the gradebook here")
    g.add_argument("--exercises", help="grade these ('all' or ids separated by commas) instead of "
                   "what the folder's handout.json assigns")
    g.add_argument("--time-limit", type=float, default=GRADING_TIME_LIMIT,
                   help="seconds per grading process (a submission, or with --isolate one exercise) "
                   "before it is stopped")
    g.add_argument("--gradescope", metavar="FILE", help="also write Gradescope's autograder "
                   "results.json here (not with --class)")
    args = parser.parse_args(argv)

    def say(message):
        print(message, file=sys.stderr, flush=True)
    try:
        if args.command == "exercises":
            print(f"{'id':<15} {'pts':>3}  {'depends on':<24} statement")
            for ex_id, ex in EXERCISES.items():
                depends = ", ".join(ex.depends) if len(ex.depends) < 3 else "most of the decoder"
                print(f"{ex_id:<15} {ex.points:>3}  {depends or '-':<24} {ex.statement}")
            return 0
        if args.command == "handout":
            make_handout(parse_exercise_ids(args.exercises), args.out, log=say)
            return 0
        ids = parse_exercise_ids(args.exercises) if args.exercises else None
        if args.class_dir:
            if args.dir or args.isolate or args.gradescope:
                raise UsageError("grade --class grades every folder under FOLDER against --reference: "
                                 "leave out DIR and --isolate (and --gradescope, which is for one copy)")
            book = grade_class(args.class_dir, args.reference, ids, args.csv, args.time_limit, log=say)
            return 0 if all(b["points"] == b["total"] for b in book) else 1
        folder = args.dir or str(HERE)
        if args.isolate:
            check_reference(args.isolate, assigned(submission_folder(folder, "grade: DIR"), ids), say)
        try:
            rows = grade(folder, args.isolate, ids, args.time_limit, log=say)
        except GradingError as err:
            print(f"cannot grade {folder}: {err}", file=sys.stderr)
            if args.gradescope:    # every exercise 0 points, with the reason
                write_gradescope(grade_rows([], assigned(folder, ids), [], blocking=False), args.gradescope,
                                 note=f"not graded: {err}")
            return 1
        if args.gradescope:
            write_gradescope(rows, args.gradescope)
        print(format_grade(rows))
        print(json.dumps(grade_summary(rows)))
        return 0 if all(r["status"] == "passed" for r in rows) else 1
    except (UsageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
