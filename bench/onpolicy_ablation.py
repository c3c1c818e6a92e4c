"""On-policy, GKD and sequence-level KD against plain KD from a student that can already write (issue 18).

``demo --ablation``'s on-policy rows start from a random student, which then learns on samples of noise. Here
every variant starts from the same warm student: the ``tiny-cpu`` preset's student trained CE-only for
``--warm-steps`` steps (seed 0, cached in the output folder), then each variant trains ``--max-steps`` more steps
from it over ``--seeds`` seeds (batch order and sampling follow the seed) and is judged on the same held-out blocks
by one plain-KD distiller (``demo.run_ablation``). Writes ``<out>/ablation.csv``,
``ablation_summary.csv`` and ``ablation.png``; prints the summary. Run:
``OMP_NUM_THREADS=1 python bench/onpolicy_ablation.py --out runs/onpolicy-ablation``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kagglekd import demo
from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller

VARIANTS = ("CE-only", "KD", "on-policy", "GKD", "sequence-level KD")


def warm_student(out: Path, steps: int) -> Path:
    """The preset's student after ``steps`` CE-only steps (trained once; reused when its export exists)."""
    run = out / f"warm-ce-{steps}"
    if not (run / "student" / "config.json").is_file():
        config = DistillConfig.load("tiny-cpu").replace(
            output_dir=str(run), alpha_kd=0.0, alpha_ce=1.0, max_steps=steps, resume="never", eval_steps=None
        )
        Distiller(config).train()
    return run / "student"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/onpolicy-ablation")
    parser.add_argument("--warm-steps", type=int, default=300)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", default=None, help='the seeds themselves, e.g. "1,2" (overrides --seeds)')
    parser.add_argument("--warm-dir", default=None, help="where the warm student is trained (default: --out)")
    parser.add_argument("--variants", default=";".join(VARIANTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    student = warm_student(Path(args.warm_dir) if args.warm_dir else out, args.warm_steps)
    seeds = [int(seed) for seed in args.seed_list.split(",")] if args.seed_list else args.seeds
    preset = out / "warm-preset.json"
    DistillConfig.load("tiny-cpu").replace(student_model=str(student)).to_json(preset)
    result = demo.run_ablation(out, args.max_steps, preset=str(preset), echo=print, seeds=seeds,
                               variants=args.variants.split(";"))  # fmt: skip
    for row in result["summary"]:
        print(row)


if __name__ == "__main__":
    main()
