"""Executable claims about README.md: what it tells a reader to type does what it says."""

import re
from pathlib import Path

import cogvla_mini as cm


def test_readme_breakpoint_stops_at_the_first_line_of_forward_lfp():
    """README's debugger command names a line of cogvla_mini.py; it must be forward_lfp's first
    statement, or a reader stops somewhere else."""
    readme = (Path(cm.__file__).parent / "README.md").read_text()
    lines = Path(cm.__file__).read_text().split("\n")
    [line] = re.findall(r'python -m pdb -c "b cogvla_mini.py:(\d+)" -c c cogvla_mini.py', readme)
    first = next(i for i, l in enumerate(lines) if "def forward_lfp(" in l) + 1
    while lines[first].strip().startswith("#"):
        first += 1
    assert int(line) == first + 1, (f"README's breakpoint is at line {line} ({lines[int(line) - 1].strip()!r}), "
                                    f"forward_lfp's first statement at line {first + 1} ({lines[first].strip()!r})")
    assert f"({line} is the line `{lines[first].strip()}`" in readme, "README names the line it stops at"
