"""Exact-only against hybrid cross-tokenizer KD on the demo's cross-tokenizer pair (issue 17's measurement).

``demo --cross-tokenizer`` trains the KD student with ``cross_tokenizer_loss: exact`` (the teacher's mapped
distribution where a teacher position has read exactly the student's text; ~5 % of the demo's student positions
end inside a teacher token and get no KD target) and its CE-only twin. This script trains the third student of the
comparison with the same preset, data, steps and seed but ``cross_tokenizer_loss: hybrid`` (exact where aligned,
ULD against the teacher's context position elsewhere), evaluates it on the same held-out blocks, and prints one
JSON object with the three students' perplexity and agreement and each KD run's coverage. Run it after the demo,
into the demo's folder: ``python bench/crosstok_hybrid.py --demo runs/demo-cross-tokenizer`` (``--max-steps``
as the demo's, when the demo was capped).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kagglekd import models, rundir
from kagglekd.config import DistillConfig
from kagglekd.trainer import Distiller


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo-cross-tokenizer", help="the demo --cross-tokenizer folder")
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args()
    demo = Path(args.demo)
    results = json.loads((demo / "results.json").read_text())
    base = DistillConfig.load("tiny-cpu").replace(teacher_model=models.TINY_MOE_8K, cross_tokenizer=True)
    base = base if args.max_steps is None else base.replace(max_steps=args.max_steps)
    if results["optimizer_steps"] != base.max_steps:
        raise SystemExit(f"the demo ran {results['optimizer_steps']} steps, this run would take {base.max_steps}: "
                         "pass --max-steps as the demo's")  # fmt: skip
    hybrid = Distiller(base.replace(output_dir=str(demo / "hybrid"), resume="never", cross_tokenizer_loss="hybrid"))
    summary = hybrid.train()
    metrics = hybrid.evaluate()

    def coverage(run: str) -> dict:
        return json.loads((demo / run / "alignment.json").read_text())["training"]

    out = {
        "steps": base.max_steps,
        "teacher_ppl": results["teacher_ppl"],
        "ce_only": {"ppl": results["ce_student_ppl"], "top1_agreement": results["ce_top1_agreement"]},
        "exact": {"ppl": results["kd_student_ppl"], "top1_agreement": results["kd_top1_agreement"],
                  "coverage": coverage("kd"), "tokens_per_s": results["kd_tokens_per_s"]},
        "hybrid": {"ppl": metrics["ppl"], "top1_agreement": metrics["top1_agreement"], "coverage": coverage("hybrid"),
                   "tokens_per_s": summary["tokens_per_s"]},
    }  # fmt: skip
    rundir.write_json(demo / "hybrid_vs_exact.json", out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
