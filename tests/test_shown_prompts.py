"""Every prompt the README, the docs and the CLI help show generates what it says.

The prompts are read from the files and from `sorakit ... --help` as a user sees them: any
quoted text (or help default) that names a colour, a shape and a direction, with the seed
given on the same line (``--seed N`` or ``seed=N``; 0, the default, otherwise). Each is
generated alone with the shipped model at the model's default settings, written to .mp4 and
read back, and scored from the frames: colour, shape, direction, a steady background, and
the background the prompt names, if it names one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sorakit.adherence import EVAL_STEPS, parse_prompt, score_video

ROOT = Path(__file__).resolve().parent.parent
QUOTED = re.compile(r"\"([^\"\n]{6,120})\"|'([^'\n]{6,120})'|“([^”\n]{6,120})”|\[default: ([^\]]{6,120})\]")
SEED = re.compile(r"(?:--seed[ =]|seed=)(\d+)")


def _cli_help_pages() -> dict[str, str]:
    """`sorakit --help` and `sorakit COMMAND --help` for every command, as a terminal shows them."""
    env = os.environ | {"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}

    def run(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "sorakit", *args, "--help"], capture_output=True, text=True,
                              env=env, check=True, timeout=120).stdout

    main = run()
    commands = re.findall(r"^│ ([a-z][a-z-]+)\s{2,}", main, flags=re.M)
    assert "generate" in commands, main
    return {"sorakit --help": main} | {f"sorakit {c} --help": run(c) for c in commands}


def _units(text: str) -> list[tuple[int, str]]:
    """(first line number, text): each line of a code block, each paragraph of prose joined
    into one line (a quoted prompt may wrap)."""
    units, paragraph, fenced = [], [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
        if fenced or not line.strip() or line.strip().startswith("```"):
            if paragraph:
                units.append((paragraph[0][0], " ".join(part for _, part in paragraph)))
                paragraph = []
            if fenced:
                units.append((n, line))
        else:
            paragraph.append((n, line.strip()))
    if paragraph:
        units.append((paragraph[0][0], " ".join(part for _, part in paragraph)))
    return units


def shown_prompts() -> dict[tuple[str, int], list[str]]:
    """(prompt, seed) -> where it is shown."""
    texts = {p.relative_to(ROOT).as_posix(): p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    units = {where: _units(text) for where, text in texts.items()}
    units |= {where: list(enumerate(page.splitlines(), 1)) for where, page in _cli_help_pages().items()}
    found: dict[tuple[str, int], list[str]] = {}
    for where, lines in units.items():
        for n, line in lines:
            seed = SEED.search(line)
            for groups in QUOTED.findall(line):
                prompt = next(g for g in groups if g).strip()
                intent = parse_prompt(prompt)
                if None in (intent.colour, intent.shape, intent.direction) or any(c in prompt for c in "{}…"):
                    continue
                found.setdefault((prompt, int(seed.group(1)) if seed else 0), []).append(f"{where}:{n}")
    return found


@pytest.fixture(scope="module")
def prompts() -> dict[tuple[str, int], list[str]]:
    return shown_prompts()


def test_the_shown_prompts_are_found(prompts):
    """The README's first command and the CLI's own examples are among them (the extraction works)."""
    assert ("a red circle moving right", 0) in prompts
    assert any(w.startswith("sorakit ") for ws in prompts.values() for w in ws), prompts
    assert len(prompts) >= 4, prompts


def test_every_shown_prompt_generates_what_it_says(prompts, tmp_path):
    from sorakit.export.reference import ReferencePipeline
    from sorakit.runtime.video import read_video, save_video
    from sorakit.train.report import load_shipped

    pipe = ReferencePipeline(load_shipped())
    wrong = []
    for i, ((prompt, seed), where) in enumerate(sorted(prompts.items())):
        video = pipe([prompt], seed=seed, steps=EVAL_STEPS).video[0]  # the model's own CFG and guidance interval
        r = score_video(read_video(save_video(video, tmp_path / f"{i}.mp4")), prompt)
        missed = [k for k in ("colour_ok", "shape_ok", "direction_ok", "background_steady") if not r[k]]
        if r["background_ok"] is False:
            missed.append("background_ok")
        if missed:
            wrong.append(f"{prompt!r} seed {seed} ({', '.join(where)}): {missed}; seen {r['colour']} {r['shape']} "
                         f"{r['direction']} on {r['background']}")
    assert not wrong, "\n".join(wrong)
