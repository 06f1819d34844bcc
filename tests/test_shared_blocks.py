"""The teaching blocks repeated in every script (marked '# SHARED: identical in every script')
must stay identical, and every script must follow the same order of sections."""
import re

import pytest

from conftest import REPO

MARK = "# SHARED: identical in every script"
# Every script of the repository that has shared blocks: a method added by copying one is checked too.
SCRIPTS = sorted(p.name for p in REPO.glob("*.py") if MARK in p.read_text())


def sections(script):
    """{title: text} of the sections that start with a '# ---- Title ----' divider."""
    text = (REPO / script).read_text()
    parts = re.split(r"^# ---- (.+?) -*$", text, flags=re.M)
    return {title: body for title, body in zip(parts[1::2], parts[2::2])}


def shared(script):
    return {t: b for t, b in sections(script).items() if b.lstrip("\n").startswith(MARK)}


def test_simclr_defines_the_shared_blocks():
    assert list(shared("simclr.py")) == [
        "Backbone", "Optimizer: LARS and schedules", "Distributed setup",
        "Distributed: gather with gradients, global BatchNorm", "Checkpoints", "Logging", "Preemption signals",
        "kNN monitor"]


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "simclr.py"])
def test_shared_blocks_identical_to_simclr(script):
    reference, blocks = shared("simclr.py"), shared(script)
    assert blocks, f"{script} has no shared blocks"
    for title, body in blocks.items():
        assert title in reference, f"{script}: shared block '{title}' does not exist in simclr.py"
        assert body == reference[title], f"{script}: block '{title}' differs from simclr.py; copy it back in sync"
    # Method scripts carry every block; linear_eval.py may leave out what it does not use.
    if script != "linear_eval.py":
        assert list(blocks) == list(reference)
    assert [t for t in reference if t in blocks] == list(blocks), f"{script}: shared blocks out of order"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_reads_in_the_same_order(script):
    titles = list(sections(script))
    assert titles[0] == "Arguments" and titles[-1] == "Training"
    text = (REPO / script).read_text()
    ending = (REPO / "simclr.py").read_text().split('\nif __name__ == "__main__":\n')[1]  # one line per error
    assert text.startswith('"""') and text.endswith('\nif __name__ == "__main__":\n' + ending)
    assert "common.UnreadableImages" in ending and "OutOfMemoryError" in ending


@pytest.mark.parametrize("script", SCRIPTS)
def test_reading_order_line_counts_in_the_docstring_are_current(script):
    """The docstring tells a reader how long the method's own part and the shared blocks are;
    those figures must stay within 10% of the sections' real lengths."""
    text = (REPO / script).read_text()
    own, common = (int(n) for n in re.search(r"\(about (\d+) lines\)\. The blocks.*?about (\d+) lines\)", text,
                                             flags=re.S).groups())
    lengths = {t: b.count("\n") for t, b in sections(script).items()}
    shared_lines = sum(n for t, n in lengths.items() if t in shared(script))
    own_lines = sum(lengths.values()) - shared_lines
    assert abs(own - own_lines) <= own_lines / 10, f"{script}: the method's part is {own_lines} lines, not {own}"
    assert abs(common - shared_lines) <= shared_lines / 10, f"{script}: the shared blocks are {shared_lines} lines"
