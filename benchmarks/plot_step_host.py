"""Each timed step's wall time against its busiest host thread's CPU time, from train_step.py JSONs (their
`step_host_s`): points on a line of slope ~1 above a floor mean the host sets the step time.

    python benchmarks/plot_step_host.py OUT.png RESULT.json [RESULT.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(path: Path) -> str:
    name = path.stem.removeprefix("train-step-")
    name = name.split("auto66-")[-1]
    return name.rsplit("-", 1)[0] if name.endswith(("-H200", "-H100")) else name


def plot(out: Path, paths: list[Path]) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for path in paths:
        data = json.loads(path.read_text())
        for row in data["rows"]:
            host = row.get("step_host_s")
            if not host or "busiest_cpu_s" not in host:
                continue
            ax.scatter([t * 1e3 for t in host["busiest_cpu_s"]], [t * 1e3 for t in row["step_times_s"]],
                       label=label(path), s=18)
    ax.set_xlabel("busiest host thread's CPU time in the step (ms)")
    ax.set_ylabel("step wall time (ms)")
    device = data.get("environment", {}).get("device", "")
    ax.set_title(f"whole-model steps: host against wall ({device})", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    plot(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
