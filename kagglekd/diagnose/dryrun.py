"""``--dry-run N``: N real optimizer steps of ``Distiller``, on the configured models when they are tiny presets
or local directories, else on tiny stand-ins of the same family (their tokens/s scaled by FLOPs per token)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from kagglekd.diagnose.context import Context
from kagglekd.memory import TINY_PRESETS, flops_per_token


def _is_moe(model_cfg) -> bool:
    from kagglekd.rules import moe_shape

    return model_cfg is not None and moe_shape(model_cfg)[0] > 0


def _local_or_tiny(name: str) -> bool:
    return name in TINY_PRESETS or (Path(name).expanduser() / "config.json").exists()


def _dry_config(ctx: Context, steps: int, workdir: Path):
    """The config of the dry run, and (teacher, student, dataset, max_length, stand_ins)."""
    cfg = ctx.config
    teacher = (
        cfg.teacher_model
        if _local_or_tiny(cfg.teacher_model)
        else ("tiny-random-moe" if _is_moe(ctx.teacher_cfg) or ctx.teacher_cfg is None else "tiny-random-dense")
    )
    student = cfg.student_model if _local_or_tiny(cfg.student_model) else "tiny-random-dense"
    stand_ins = (teacher, student) != (cfg.teacher_model, cfg.student_model)
    dataset = (
        cfg.dataset if (cfg.dataset == "stdlib-docs" or Path(cfg.dataset).expanduser().exists()) else "stdlib-docs"
    )
    max_length = min(cfg.max_length, 256) if stand_ins else cfg.max_length
    changes = dict(
        teacher_model=teacher,
        student_model=student,
        dataset=dataset,
        max_length=max_length,
        max_steps=steps,
        stop_after=None,
        warmup_steps=None,
        warmup_ratio=0.0,
        eval_steps=None,
        eval_max_blocks=2,
        save_steps=None,
        early_stopping_patience=None,
        alpha_feature=0.0,
        alpha_attention=0.0,
        attention_layers=None,
        output_dir=str(workdir),
        resume="never",
    )
    if stand_ins:
        changes.update(tokenizer=None, teacher_tokenizer=None, dataset_config=None)
    if dataset != cfg.dataset:
        changes.update(dataset_subset_size=None, text_column="text", dataset_split="train")
    return cfg.replace(**changes), (teacher, student, dataset, max_length, stand_ins)


def run_dry_run(ctx: Context, steps: int, workdir: str | Path | None = None) -> dict:
    """``steps`` real optimizer steps of ``Distiller`` (configured models if tiny/local, else stand-ins)."""
    import torch

    from kagglekd.trainer import Distiller

    workdir = Path(workdir or tempfile.mkdtemp(prefix="kagglekd-dry-run-"))
    dry_cfg, (teacher, student, dataset, max_length, stand_ins) = _dry_config(ctx, steps, workdir)
    distiller = Distiller(dry_cfg, output_dir=workdir)
    summary = distiller.train(max_steps=steps)
    rows = list(getattr(distiller.history, "rows", distiller.history))
    t_model = getattr(distiller, "teacher", None)
    t_cfg = getattr(t_model, "config", None) or ctx.teacher_cfg
    s_cfg = distiller.student.config
    same_data = not stand_ins and dataset == ctx.config.dataset and max_length == ctx.config.max_length
    return {
        "steps": summary.get("optimizer_steps", steps),
        "tokens_per_s": summary.get("tokens_per_s"),
        "wall_time_s": summary.get("wall_time_s"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "stand_ins": stand_ins,
        "teacher": teacher,
        "student": student,
        "dataset": dataset,
        "max_length": max_length,
        "flops_per_token": flops_per_token(t_cfg, s_cfg, max_length) if t_cfg is not None else None,
        "train_blocks": len(distiller.blocks.train) if same_data else None,
        "run_dir": str(workdir),
        "history": rows,
    }
