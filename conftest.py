"""What the test files share: the `check` of an exercise's cases, what a stub does to a test
(in a handout, an exercise not yet written), and helpers that more than one test file uses."""

import pytest
import torch

import cogvla_mini as cm
import exercises
from exercises import stub_outcome


def pytest_collection_modifyitems(items):
    """`pytest -k <id>` selects the tests marked @pytest.mark.exercise(<id>)."""
    for item in items:
        if mark := item.get_closest_marker("exercise"):
            item.extra_keyword_matches.add(mark.args[0])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """An exercise test's failed check reads as its message alone, without a traceback into the
    checking code. A test that runs into a stub (NotImplementedError "exercise <id>: not
    started") fails as "not started" if it is that exercise's, and is skipped as blocked by it
    otherwise (in a handout, an exercise not yet written)."""
    report = yield
    error = call.excinfo.value if call.excinfo else None
    mark = item.get_closest_marker("exercise")
    own = mark.args[0] if mark else None
    stub = stub_outcome(str(error), own) if isinstance(error, NotImplementedError) else None
    if stub and stub[0] == "not started":
        report.longrepr = stub[1]
    elif stub:
        report.outcome, report.longrepr = "skipped", (str(item.path), item.location[1], stub[1])
    elif own and isinstance(error, AssertionError):
        report.longrepr = f"exercise {own}: {error}"
    return report


@pytest.fixture
def check():
    """check(case, ...): run each case on cogvla_mini and compare (exercises.check)."""
    return lambda *cases: [exercises.check(case, cm) for case in cases]


def randomize_films(model, router=True, vision=True, std=0.5):
    """Give the (zero-initialised) FiLM output layers real weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.llm.layers:
            if router and isinstance(layer, cm.LFPDecoderLayer):
                for mlp in (layer.router.film_scale, layer.router.film_shift):
                    mlp[-1].weight.copy_(torch.randn(mlp[-1].weight.shape, generator=g) * std)
        if vision:
            for vit in (model.vision.dino, model.vision.siglip):
                for block in vit.blocks:
                    for film in (block.film_scale, block.film_shift):
                        film.weight.copy_(torch.randn(film.weight.shape, generator=g) * std)
