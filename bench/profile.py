"""Summaries of py-spy's raw (collapsed) profiles: ``python -m bench.profile FILE [N]``.

Prints where the samples were: the N functions with the most samples on top of the stack
(self), and the N with the most samples anywhere on the stack (inclusive), as shares of all
samples. Idle samples (py-spy --idle is off by default) are not recorded, so shares are of the
time the process was running Python.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

__all__ = ["summarize"]


def _frame(raw: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = raw.partition(" (")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def summarize(path: Path, top: int = 15) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
    if not total:
        return f"{path.name}: no samples"
    out = [f"{path.name}: {total} samples", "  self:"]
    out += [f"    {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        if arg.isdigit():
            continue
        n = int(sys.argv[-1]) if sys.argv[-1].isdigit() else 15
        print(summarize(Path(arg), n))
