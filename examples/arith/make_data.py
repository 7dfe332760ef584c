"""Generate the demo data set: GSM8K-style arithmetic word problems with ``#### N`` answers.

    python examples/arith/make_data.py      # writes train.jsonl and heldout.jsonl here

Deterministic (seeded); the shipped files are its output. Each row has ``prompt``,
``response`` (the worked answer, for SFT), ``answer`` (the number, the ground truth of
``reward=math``) and ``data_source``. No problem text is in both splits.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]
ITEMS = ["apple", "pen", "cup", "book", "egg", "card", "shell", "coin"]


def problem(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        text, work, ans = f"{name} has {a} {item}s and gets {b} more. How many {item}s now?", f"{a}+{b}", a + b
    elif kind == "sub":
        a = rng.randint(5, 25)
        b = rng.randint(2, a - 1)
        text, work, ans = f"{name} has {a} {item}s and gives away {b}. How many {item}s left?", f"{a}-{b}", a - b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        text, work, ans = f"{name} buys {a} bags of {b} {item}s. How many {item}s in all?", f"{a}*{b}", a * b
    return {"prompt": text + "\n", "response": f"{work}={ans}\n#### {ans}", "answer": str(ans),
            "data_source": f"arith/{kind}"}


def main(out: Path = Path(__file__).resolve().parent, n_train: int = 4000, n_heldout: int = 256) -> None:
    rng = random.Random(12)
    seen, train, heldout = set(), [], []
    while len(heldout) < n_heldout:
        row = problem(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            heldout.append(row)
    while len(train) < n_train:
        row = problem(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            train.append(row)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
