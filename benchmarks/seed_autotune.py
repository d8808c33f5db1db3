"""Seed this GPU's autotune cache with another GPU's picks (same Triton version): for runs that check memory or
profiles on a GPU whose own cold tuning would take most of a device call (57a: > 530 s for three shapes).

    python benchmarks/seed_autotune.py benchmarks/results/autotune-H100.json .autotune/autotune.json

Entries whose GPU name differs from this machine's GPU 0 are copied under its name, unless it has its own already.
Timings taken with seeded picks are the other GPU's configs, not this one's tuned best: say so where they are used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="an autotune.json of another GPU")
    parser.add_argument("cache", type=Path, help="this machine's autotune.json (created or extended)")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name(0)
    entries = json.loads(args.cache.read_text()) if args.cache.exists() else {}
    seeded = 0
    for key, pick in json.loads(args.source.read_text()).items():
        other, rest = key.split("|", 1)
        mine = f"{gpu}|{rest}"
        if other != gpu and mine not in entries:
            entries[mine] = pick
            seeded += 1
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    args.cache.write_text(json.dumps(entries, indent=0, sort_keys=True))
    print(f"seeded {seeded} picks for {gpu} from {args.source}")


if __name__ == "__main__":
    main()
