"""GPU check: the two T4 presets at real size through the kit's own trainer; peak memory vs the planner, tokens/s.

    python bench/gpu_check.py --out bench/GPU_RESULTS.md             # any CUDA machine; <= ~8 min on one GPU
    python bench/gpu_check.py --tiny --out /tmp/gpu_check.md          # tiny shapes (automatic without CUDA)

What runs. The architectures of both T4 presets are built from the model cards in ``kagglekd/presets/`` with random
weights (``AutoModelForCausalLM.from_config`` + ``save_pretrained`` into a work directory, beside the kit's demo
tokenizer; nothing is downloaded): SmolLM2-360M -> SmolLM2-135M (``smollm2-360m-to-135m-t4x2``, one tokenizer) and
Huihui-MoE-1.2B-A0.6B -> SmolLM-135M (``smollm-135m-from-huihui-moe-t4x2``, cross-tokenizer: the student reads the
4,096-token demo tokenizer, the teacher the 8,192-token digit-splitting one, both at the real model widths of
49,152 and 151,936 rows). Each variant is the preset plus a few overrides (``VARIANTS``), trained by
``kagglekd.trainer.Distiller`` for ``--steps`` optimizer steps on the offline stdlib-docs corpus, with no eval, no
checkpoint and no export (the plan is one step longer than the session, ``Distiller.train(max_steps=...)``).
Gradient accumulation is 1 (``--accumulation``): the planner's peak does not depend on it.

Measured. CUDA: ``torch.cuda.max_memory_allocated`` per device, reset after the models are loaded (so a row is the
peak of the training steps, weights included), read and reset after every step; minus what was allocated before the
models loaded (~0). It cannot see the CUDA context, so the ratio divides it by the plan minus the planner's
``runtime_overhead`` part (column "planned comparable"); "planned GiB" is the planner's whole figure. CPU: the
process's peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` after the models load and after
every step) minus ``VmRSS`` before the models loaded (after ``gc`` + ``malloc_trim``), compared with the whole CPU
plan (the planner's CPU overhead models allocator arenas, which RSS does see). No ``/proc``: measured is None, said
in the row. Planned: ``kagglekd.memory.plan_memory`` as diagnose calls it (the run's config, the loaded models'
configs, ``gradient_checkpointing``, ``sar``, the placement of the strategy), on the profile of ``cuda:0`` or
``cpu``. tokens/s: the trainer's own per-step ``tokens_per_s`` (valid targets of the window over all ranks / step
time), median over the steps after the first (the first warms kernels up).

Generation. The on-policy rows (``lmbda`` 1: every micro-batch is the student's own continuation of its block's
first half) time ``generate`` per step: the history's ``generation_share`` x step time (``tokens / tokens_per_s``),
median over the steps after the first, against ``onpolicy.generation_plan`` on the run's device profile with the
loaded models' configs. On a GPU that is the first measurement of ``DECODE_OVERHEAD_S["gpu"]`` and ``BANDWIDTH``
in ``kagglekd/onpolicy.py`` (a second table in the Markdown; on CPU it checks their ``"cpu"`` entries).

Precision. ``fp16`` rows force the kit's T4 plan (fp16 autocast + GradScaler, fp16 teacher, fp32 student) by giving
``models.precision_for`` compute capability 7.5; ``bf16`` rows force 8.0 and run only where the GPU is >= sm_80
(``torch.cuda.is_bf16_supported()`` is True on a T4 through emulation, which the kit never trains with). On a CPU
there is no autocast: the fp16 rows run in fp32 and say so; the bf16 rows are skipped.

Robust: every variant runs in try/except (an error, CUDA OOM included, is recorded in its row and the next variant
runs), memory is released between variants (``gc``, ``torch.cuda.empty_cache``, accelerate's state reset), results
are written after every variant, and a time budget (``--budget-s``) skips the variants left with a note. Variants
needing two GPUs (strategy split, ddp) are skipped with the reason on fewer; ddp runs ``torch.distributed.run`` on
this script's ``--worker`` mode (on CPU too with ``--cpu-ddp``: gloo, which exercises the launcher).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")  # models come from configs; nothing may reach a hub (set before transformers)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the kit of this checkout, installed or not (also in the ddp workers)

from kagglekd import corpus, memory, models, onpolicy  # noqa: E402
from kagglekd.config import DistillConfig  # noqa: E402
from kagglekd.gpus import GiB  # noqa: E402

# ---- what runs -------------------------------------------------------------------------------------------------
# The two T4 presets and the model cards of their architectures; (vocab, pre-tokenizer) of each side's demo tokenizer.
PAIRS = {
    "same": dict(
        preset="smollm2-360m-to-135m-t4x2",
        teacher="HuggingFaceTB/SmolLM2-360M",
        student="HuggingFaceTB/SmolLM2-135M",
        teacher_tokenizer=(4096, "bytelevel"),
    ),
    "cross": dict(
        preset="smollm-135m-from-huihui-moe-t4x2",
        teacher="huihui-ai/Huihui-MoE-1.2B-A0.6B",
        student="HuggingFaceTB/SmolLM-135M",
        teacher_tokenizer=(8192, "bytelevel-digits"),
    ),
}
STUDENT_TOKENIZER = (4096, "bytelevel")


@dataclass(frozen=True)
class Variant:
    """One row of the check: a preset (``pair``) plus ``overrides``, at a precision, on ``gpus`` GPUs."""

    name: str
    pair: str
    overrides: dict = field(default_factory=dict)
    dtype: str = "fp16"  # fp16 (the T4 plan: autocast + GradScaler) or bf16 (sm_80+)
    gpus: int = 1
    ddp: bool = False  # one process per GPU through torch.distributed.run

    @property
    def id(self) -> str:
        return f"{self.name}/{self.dtype}"

    @property
    def slug(self) -> str:
        """The id as a directory name."""
        return self.id.replace(":", "-").replace("/", "-").replace(",", "-")


# On-policy (GKD) as the kit's rules recommend it: every micro-batch is the student's own continuation of the
# block's first half (prompt_length / max_new_tokens unset: max_length // 2, then as many as fill the block), and
# no CE on those samples (alpha_ce 0). These rows time ``generate`` against ``onpolicy.generation_plan``.
ON_POLICY = {"lmbda": 1.0, "alpha_ce": 0.0}

# In order of importance: a time budget that runs out skips the last ones. "same": the SmolLM2 preset as shipped
# (fused KD, top-256); "cross": the Huihui-MoE preset as shipped (cross-tokenizer, fused KD, top-256).
VARIANTS = (
    Variant("same:preset", "same"),
    Variant("cross:preset", "cross"),
    Variant("same:unfused", "same", {"fused_kd": False}),
    Variant("same:full-vocab", "same", {"kd_top_k": None}),
    Variant("same:unfused,full-vocab", "same", {"fused_kd": False, "kd_top_k": None}),
    Variant("cross:sar", "cross", {"sar": True}),
    Variant("cross:unfused", "cross", {"fused_kd": False}),
    Variant("same:on-policy", "same", ON_POLICY),
    Variant("cross:on-policy", "cross", ON_POLICY),
    Variant("same:preset", "same", dtype="bf16"),
    Variant("cross:preset", "cross", dtype="bf16"),
    Variant("same:split", "same", {"strategy": "split"}, gpus=2),
    Variant("cross:split", "cross", {"strategy": "split"}, gpus=2),
    Variant("same:ddp", "same", {"strategy": "ddp"}, gpus=2, ddp=True),
    Variant("cross:ddp", "cross", {"strategy": "ddp"}, gpus=2, ddp=True),
)

# Tiny shapes (--tiny): the card's family and options with few layers and a small width; vocab = the tokenizer's.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
TINY_NOTE = ("Tiny shapes: the plans are mostly the planner's fixed CPU overhead (0.125 GiB), so these ratios say "
             "little; the tiny run checks that every variant runs.")  # fmt: skip
# Run settings per mode: (batch_size, max_length) None = the preset's; documents of stdlib-docs read.
MODES = {
    "real": dict(batch_size=None, max_length=None, documents=16, steps=4),
    "tiny": dict(batch_size=2, max_length=32, documents=4, steps=2),
}


# ---- the machine ------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    """GPU names, count, compute capabilities, memory; torch / CUDA / transformers versions."""
    import accelerate
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "cpu_count": os.cpu_count(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpus": [],
    }
    for index in range(info["gpu_count"]):
        props = torch.cuda.get_device_properties(index)
        info["gpus"].append(
            {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / GiB}
        )
    if info["gpu_count"]:
        info["is_bf16_supported"] = torch.cuda.is_bf16_supported()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.split("\n")[0]
    return info


def skip_reason(variant: Variant, info: dict, args) -> str | None:
    """Why ``variant`` cannot run on this machine, or None."""
    gpus = info["gpu_count"]
    cpu_ddp = variant.ddp and gpus == 0 and args.cpu_ddp  # gloo: two CPU processes
    if variant.gpus > 1 and gpus < variant.gpus and not cpu_ddp:
        if variant.ddp:
            what = "ddp runs one process per GPU" + ("" if gpus else " (--cpu-ddp runs it on CPU with gloo)")
        else:
            what = "strategy split puts the teacher on a second GPU (the trainer refuses it with fewer)"
        return f"needs {variant.gpus} GPUs, {gpus} visible: {what}"
    if variant.dtype == "bf16":
        if not gpus:
            return "CPU: no autocast (the kit's precision plan); the fp16 rows ran in fp32"
        capability = info["gpus"][0]["capability"]
        if tuple(int(part) for part in capability.split(".")) < (8, 0):
            return (f"compute capability {capability} < 8.0: the kit trains fp16 + GradScaler here "
                    "(is_bf16_supported() is emulation below sm_80)")  # fmt: skip
    return None


@contextlib.contextmanager
def precision(dtype: str):
    """Force the kit's precision plan of ``dtype`` on CUDA devices (fp16: a T4's, bf16: an sm_80 GPU's)."""
    original, forced_capability = models.precision_for, {"fp16": (7, 5), "bf16": (8, 0)}[dtype]

    def forced(device, capability=None):
        if capability is None and torch.device(device).type == "cuda":
            capability = forced_capability
        return original(device, capability)

    models.precision_for = forced
    try:
        yield
    finally:
        models.precision_for = original


# ---- models from the cards -------------------------------------------------------------------------------------
def model_config(model_id: str, vocab: int | None):
    """The transformers config of a carded model; ``vocab`` set: the tiny shape with that vocabulary."""
    card = memory.load_card(model_id)
    if card is None:
        raise FileNotFoundError(f"no model card for {model_id} in {memory.card_path(model_id)}")
    config = memory.config_from_card(card)
    if vocab is not None:
        for key, value in {**TINY_SHAPE, "vocab_size": vocab}.items():
            if key != "moe_intermediate_size" or hasattr(config, key):
                setattr(config, key, value)
    return config


def build_model_dir(model_id: str, tokenizer_spec: tuple[int, str], root: Path, tiny: bool) -> Path:
    """``root/<card name>``: random weights of the card's architecture (``from_config``) and a demo tokenizer.

    Real size on a GPU: initialised on cuda:0 and saved in float16 (the trainer casts on load), then freed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab, pre_tokenizer = tokenizer_spec
    out = root / (memory.card_path(model_id).stem.removeprefix("card-") + ("-tiny" if tiny else ""))
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(corpus.demo_tokenizer(vocab, pre_tokenizer=pre_tokenizer))
    config = model_config(model_id, len(tokenizer) if tiny else None)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id  # the card's ids name the real tokenizer's
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"{model_id}: vocab_size {config.vocab_size} < the demo tokenizer's {len(tokenizer)}")
    on_gpu = torch.cuda.is_available() and not tiny
    with torch.random.fork_rng(devices=[]), torch.device("cuda" if on_gpu else "cpu"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model = model.half() if on_gpu else model.float()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    release_memory()
    return out


def pair_dirs(pair: str, root: Path, tiny: bool, cache: dict) -> tuple[Path, Path]:
    """(teacher dir, student dir) of ``pair``, built once per run."""
    if pair not in cache:
        spec = PAIRS[pair]
        teacher = build_model_dir(spec["teacher"], spec["teacher_tokenizer"], root, tiny)
        student = build_model_dir(spec["student"], STUDENT_TOKENIZER, root, tiny)
        cache[pair] = (teacher, student)
    return cache[pair]


def variant_config(variant: Variant, dirs: tuple[Path, Path], out_dir: Path, args) -> DistillConfig:
    """The pair's preset plus the run settings of this check plus the variant's overrides."""
    mode = MODES["tiny" if args.tiny else "real"]
    preset = DistillConfig.load(PAIRS[variant.pair]["preset"])
    run = dict(
        teacher_model=str(dirs[0]), student_model=str(dirs[1]), tokenizer=None, teacher_tokenizer=None,
        dataset="stdlib-docs", dataset_config=None, dataset_subset_size=args.documents or mode["documents"],
        gradient_accumulation_steps=args.accumulation, max_steps=args.steps + 1, stop_after=None, eval_steps=None,
        save_steps=None, early_stopping_patience=None, ema_decay=None, log_steps=1, resume="never",
        output_dir=str(out_dir), strategy="single",  # auto would pick split on two GPUs
    )  # fmt: skip
    for key in ("batch_size", "max_length"):
        run[key] = mode[key] or getattr(preset, key)
    return preset.replace(**{**run, **variant.overrides})


# ---- measuring ------------------------------------------------------------------------------------------------
def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the next RSS baseline is honest


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Meter:
    """Peak memory of the training steps on ``devices`` (CUDA: allocator; CPU: resident set), in bytes."""

    def __init__(self, devices: list[torch.device]):
        self.devices = list(dict.fromkeys(devices))
        self.cuda = all(d.type == "cuda" for d in self.devices)
        self.base: list[int] = []
        self.step_peaks: list[list[int]] = []
        self.unavailable = None if self.cuda or _proc_status("VmHWM") is not None else "no /proc/self/status"

    def baseline(self) -> None:
        """What is held before the models load (called before ``Distiller.setup``)."""
        release_memory()
        if self.cuda:
            self.base = [torch.cuda.memory_allocated(d) for d in self.devices]
        else:
            self.base = [_proc_status("VmRSS") or 0]

    def start(self) -> None:
        """Reset the peak counters after the models loaded: what follows is the training steps."""
        if self.cuda:
            for device in self.devices:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def step(self) -> None:
        """Read each device's peak since the last reset (one optimizer step), then reset."""
        if self.unavailable:
            return
        if self.cuda:
            peaks = [torch.cuda.max_memory_allocated(d) - b for d, b in zip(self.devices, self.base)]
        else:
            peaks = [(_proc_status("VmHWM") or 0) - self.base[0]]
        self.step_peaks.append(peaks)
        self.start()

    def peaks(self) -> list[int] | None:
        if not self.step_peaks:
            return None
        return [max(step[i] for step in self.step_peaks) for i in range(len(self.devices))]

    def reserved(self) -> list[int] | None:
        return [torch.cuda.max_memory_reserved(d) for d in self.devices] if self.cuda else None


class StepRecorder:
    """Trainer callback: each optimizer step's history row, and the meter's per-step peak. A run that generates
    (on-policy / seq_kd) adds the step's seconds in ``generate`` (``generation_share`` x step time, the step time
    being ``tokens / tokens_per_s``) and its mean generated length."""

    def __init__(self, meter: Meter):
        self.meter, self.rows = meter, []

    def on_log(self, row: dict) -> None:
        self.meter.step()
        recorded = {k: row.get(k) for k in ("step", "loss", "tokens", "tokens_per_s", "skipped")}
        if "generation_share" in row:
            step_seconds = row["tokens"] / row["tokens_per_s"] if row["tokens_per_s"] else float("nan")
            recorded["generation_s"] = row["generation_share"] * step_seconds
            recorded["generated_length"] = row["generated_length"]
        self.rows.append(recorded)


def trainer_facts(distiller) -> dict:
    """What the trainer really ran: precision, strategy, loss path, cross-tokenizer, SAR routers, widths."""
    cfg, student = distiller.config, distiller.accelerator.unwrap_model(distiller.student)
    teacher = distiller.teacher
    return {
        "mixed_precision": distiller.accelerator.mixed_precision,
        "grad_scaler": distiller.accelerator.scaler is not None,
        "teacher_dtype": str(next(teacher.parameters()).dtype) if teacher is not None else None,
        "strategy": distiller.strategy,
        "processes": distiller.world,
        "fused_kd": cfg.fused_kd,
        "kd_top_k": cfg.kd_top_k,
        "lmbda": cfg.lmbda,
        "seq_kd": cfg.seq_kd,
        "cross_tokenizer": distiller.cross is not None,
        "sar_router_parameters": sum(p.numel() for p in distiller.teacher_side.router_params),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "teacher_vocab": teacher.get_output_embeddings().weight.shape[0] if teacher is not None else None,
        "student_vocab": distiller.student_vocab,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
    }


def planner_inputs(distiller) -> dict:
    """What the planner reads of a loaded run: the profile of its device and the loaded models' configs."""
    from kagglekd import gpus

    return dict(
        gpu=gpus.resolve(distiller.device),
        teacher_cfg=distiller.teacher.config if distiller.teacher is not None else None,
        student_cfg=distiller.accelerator.unwrap_model(distiller.student).config,
    )


def planned(distiller) -> list[memory.MemoryPlan]:
    """The planner's per-device plans for the run (one; two under split: student GPU, teacher GPU)."""
    cfg = distiller.config
    kw = dict(planner_inputs(distiller), gradient_checkpointing=cfg.gradient_checkpointing, sar=cfg.sar)
    placements = ("student", "teacher") if distiller.strategy == "split" else ("both",)
    return [memory.plan_memory(cfg, placement=placement, **kw) for placement in placements]


def planned_generation(distiller) -> dict | None:
    """The planner's generation estimate of the run (``onpolicy.generation_plan``: KV cache, seconds per step) and
    the tokens it assumes each prompt gets; None when the run never generates."""
    cfg = distiller.config
    if not onpolicy.active(cfg):
        return None
    inputs = planner_inputs(distiller)
    plan = onpolicy.generation_plan(cfg, **inputs)
    profile = inputs["gpu"]
    return {**plan.to_dict(), "new_tokens": onpolicy.new_tokens(cfg), "profile": profile.name,
            "peak_flops": profile.peak_flops}  # fmt: skip


def reset_accelerate() -> None:
    """A fresh accelerate state, so a variant can choose another mixed precision than the previous one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def run_devices(config: DistillConfig) -> list[torch.device]:
    """The devices this process's run uses, known before it loads (the meter's baseline comes first): the process's
    GPU (``LOCAL_RANK`` under ddp), and the next one for the teacher under split; or the CPU."""
    if not torch.cuda.is_available():
        return [torch.device("cpu")]
    local = int(os.environ.get("LOCAL_RANK", "0"))
    devices = [torch.device("cuda", local)]
    return devices + [torch.device("cuda", local + 1)] if config.strategy == "split" else devices


def measure(config: DistillConfig, dtype: str, steps: int, finish=None) -> dict:
    """Train ``steps`` steps of ``config`` in this process; the raw measurement (this process's view).
    ``finish(distiller, result)``, when given, runs before the trainer is released (a ddp worker's exit)."""
    from kagglekd.trainer import Distiller

    cuda = torch.cuda.is_available()
    meter = Meter(run_devices(config))
    recorder = StepRecorder(meter)
    with precision(dtype) if cuda else contextlib.nullcontext():
        reset_accelerate()
        meter.baseline()
        started = time.perf_counter()
        distiller = Distiller(config, callbacks=[recorder])
        try:
            distiller.setup()
            meter.start()
            summary = distiller.train(max_steps=steps)
            if not meter.step_peaks:  # a rank > 0 gets no callbacks: its peak over all the steps
                meter.step()
            result = {
                "rank": distiller.rank,
                "devices": [str(d) for d in meter.devices],
                "peaks": meter.peaks(),
                "step_peaks": meter.step_peaks,
                "reserved": meter.reserved(),
                "unmeasured": meter.unavailable,
                "rows": recorder.rows,
                "skipped": summary["skipped"],
                "facts": trainer_facts(distiller),
                "plans": [plan.to_dict() for plan in planned(distiller)],
                "generation_plan": planned_generation(distiller),
                "seconds": time.perf_counter() - started,
            }
            if finish is not None:
                finish(distiller, result)
            return result
        finally:
            distiller.callbacks.clear()
            del distiller
            reset_accelerate()
            release_memory()


# ---- ddp: one process per device through torch.distributed.run ---------------------------------------------
def measure_ddp(variant: Variant, config: DistillConfig, args, workdir: Path, timeout: float) -> list[dict]:
    """Launch this script's ``--worker`` mode on ``variant.gpus`` processes; every rank's measurement."""
    spec_dir = workdir / "ddp" / variant.slug
    shutil.rmtree(spec_dir, ignore_errors=True)
    spec_dir.mkdir(parents=True)
    spec = {"config": config.to_dict(), "dtype": variant.dtype, "steps": args.steps, "out": str(spec_dir)}
    (spec_dir / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(variant.gpus),
               str(Path(__file__).resolve()), "--worker", str(spec_dir / "spec.json")]  # fmt: skip
    release_memory()
    # A session of its own, so a launch past its time is ended with its workers (which hold the GPUs).
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        _, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise TimeoutError(f"torch.distributed.run ran past {timeout:.0f} s; its process group was killed") from None
    results = [json.loads(path.read_text()) for path in sorted(spec_dir.glob("rank*.json"))]
    if child.returncode != 0 or len(results) != variant.gpus:
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-3:]
        raise RuntimeError(f"torch.distributed.run exited {child.returncode}: {' | '.join(tail)}")
    return results


def ddp_worker(spec_path: str) -> None:
    """One rank of a ddp variant: measure, write ``rank<r>.json``, leave like the kit's own workers do."""
    from kagglekd.launch import leave_worker

    spec = json.loads(Path(spec_path).read_text())

    def finish(distiller, result: dict) -> None:
        Path(spec["out"], f"rank{distiller.rank}.json").write_text(json.dumps(result))
        leave_worker(distiller)  # waits for every rank, then os._exit: no process-group teardown race

    measure(DistillConfig.from_dict(spec["config"]), spec["dtype"], spec["steps"], finish=finish)


# ---- rows -----------------------------------------------------------------------------------------------------
def _dtype_label(facts: dict) -> str:
    mixed = facts["mixed_precision"]
    return {"fp16": "fp16+GradScaler" if facts["grad_scaler"] else "fp16", "bf16": "bf16", "no": "fp32"}.get(
        mixed, mixed
    )


def generation_figures(result: dict) -> dict:
    """Planned vs measured ``generate`` time of a run that generates (nothing otherwise): the medians, over the steps
    after the first (the first warms up), of each step's seconds in ``generate`` and mean generated length, against
    ``onpolicy.generation_plan``'s seconds per step, which assume every prompt gets ``new_tokens`` tokens."""
    plan = result.get("generation_plan")
    if plan is None:
        return {}
    steps = result["rows"][1:] or result["rows"]
    seconds = [r["generation_s"] for r in steps if math.isfinite(r.get("generation_s", math.nan))]
    lengths = [r["generated_length"] for r in steps if math.isfinite(r.get("generated_length", math.nan))]
    measured, planned_s = (statistics.median(seconds) if seconds else None), plan["seconds_per_step"]
    return {
        "generation_s_measured": measured,
        "generation_s_planned": planned_s,
        "generation_ratio": measured / planned_s if measured is not None and planned_s > 0 else None,
        "generated_length": statistics.median(lengths) if lengths else None,
        "generation_new_tokens": plan["new_tokens"],
        "generation_kv_cache_gib": plan["kv_cache_bytes"] / GiB,
        "generation_profile": plan["profile"],
        "generation_peak_flops": plan["peak_flops"],
        "generation_s_steps": [r.get("generation_s") for r in result["rows"]],
    }


def make_row(variant: Variant, results: list[dict], cuda: bool) -> dict:
    """The row of a variant that ran: per device (or rank) planned vs measured, tokens/s, what the trainer ran."""
    results = sorted(results, key=lambda r: r["rank"])
    main = results[0]
    if len(results) > 1:  # ddp: every rank holds the whole pair; one plan per process
        labels = [f"rank {r['rank']} {r['devices'][0]}" for r in results]
        plans = [main["plans"][0]] * len(results)
        measured = [r["peaks"][0] if r["peaks"] else None for r in results]
    else:
        labels = [f"{d} ({p['placement']})" if p["placement"] != "both" else d for d, p in zip(main["devices"],
                  main["plans"])]  # fmt: skip
        plans, measured = main["plans"], main["peaks"] or [None] * len(main["plans"])
    comparable = [p["total"] - (p["parts"]["runtime_overhead"] if cuda else 0) for p in plans]
    ratios = [m / c if m is not None and c > 0 else None for m, c in zip(measured, comparable)]
    speeds = [r["tokens_per_s"] for r in main["rows"]]
    timed = speeds[1:] or speeds
    return {
        "id": variant.id,
        "variant": variant.name,
        "status": "ok",
        "dtype": _dtype_label(main["facts"]),
        "devices": labels,
        "planned_gib": [p["total"] / GiB for p in plans],
        "planned_comparable_gib": [c / GiB for c in comparable],
        "measured_gib": [m / GiB if m is not None else None for m in measured],
        "ratio": max((r for r in ratios if r is not None), default=None),
        "ratios": ratios,
        "reserved_gib": [b / GiB for b in main["reserved"]] if main["reserved"] else None,
        "tokens_per_s": statistics.median(timed) if timed else None,
        "steps": len(main["rows"]),
        "skipped_steps": main["skipped"],
        "step_peaks_gib": [[b / GiB for b in step] for step in main["step_peaks"]],
        "verdicts": [p["verdict"] for p in plans],
        "plan_parts_gib": [{k: v / GiB for k, v in p["parts"].items()} for p in plans],
        "facts": main["facts"],
        "seconds": max(r["seconds"] for r in results),
        "note": main["unmeasured"] and f"measured None: {main['unmeasured']}",
        **generation_figures(main),
    }


def other_row(variant: Variant, status: str, note: str) -> dict:
    return {"id": variant.id, "variant": variant.name, "status": status, "dtype": variant.dtype, "note": note}


def error_note(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
    return ("OOM: " if oom else "") + f"{type(err).__name__}: {text}"[:400]


# ---- output -----------------------------------------------------------------------------------------------------
def _cell(values, digits: int = 3) -> str:
    if values is None:
        return ""
    values = values if isinstance(values, list) else [values]
    return " / ".join("None" if v is None else f"{v:.{digits}f}" for v in values)


def _note(row: dict) -> str:
    if row["status"] != "ok":
        return row["note"]
    facts = row["facts"]
    loss = ("fused" if facts["fused_kd"] else "unfused") + (f", top-{facts['kd_top_k']}" if facts["kd_top_k"] else
                                                             ", full vocab")  # fmt: skip
    parts = [facts["strategy"] + (f" x{facts['processes']}" if facts["processes"] > 1 else ""), loss]
    if facts["cross_tokenizer"]:
        parts.append("cross-tokenizer")
    if facts["sar_router_parameters"]:
        parts.append(f"SAR ({facts['sar_router_parameters']:,} router params)")
    if facts["lmbda"] or facts["seq_kd"]:
        parts.append(f"on-policy lmbda {facts['lmbda']:g}" + (", seq_kd" if facts["seq_kd"] else ""))
    if row["skipped_steps"]:
        parts.append(f"{row['skipped_steps']} step(s) skipped (non-finite)")
    if row.get("note"):
        parts.append(row["note"])
    return ", ".join(parts) + "; " + " / ".join(row["devices"])


def _header(info: dict, args, elapsed: float) -> list[str]:
    gpus = ", ".join(f"{g['name']} (sm_{g['capability'].replace('.', '')}, {g['memory_gib']:.1f} GiB)"
                     for g in info["gpus"]) or "none (CPU)"  # fmt: skip
    driver = f", driver {info['driver']}" if info.get("driver") else ""
    if info["gpu_count"]:
        measured = "max_memory_allocated of the training steps; ratio = measured / planned comparable (the plan "
        measured += "without its runtime_overhead: the CUDA context, which the allocator cannot see)"
    else:
        measured = "peak RSS delta of the training steps; ratio = measured / the whole CPU plan"
    return [
        "# GPU check: T4 presets at real size, planned vs measured peak memory" + (" (tiny shapes)" * args.tiny),
        "",
        f"Command: `python bench/gpu_check.py {' '.join(args.argv)}` ({elapsed:.0f} s). Method: bench/gpu_check.py.",
        f"Machine: {info['gpu_count']} GPU(s): {gpus}; torch {info['torch']}, CUDA {info['cuda']}, transformers "
        f"{info['transformers']}, accelerate {info['accelerate']}, Python {info['python']}, {info['cpu_count']} "
        f"CPUs{driver}.",
        f"Measured = {measured}. Steps per variant: {args.steps} (tokens/s: median after the first).",
        "Pairs: same = SmolLM2-360M -> SmolLM2-135M (smollm2-360m-to-135m-t4x2: fused KD, top-256); cross = "
        "Huihui-MoE-1.2B-A0.6B -> SmolLM-135M (smollm-135m-from-huihui-moe-t4x2: cross-tokenizer, fused, top-256).",
        *([TINY_NOTE] if args.tiny else []),
        "",
        "| variant | dtype | status | planned GiB | planned comparable GiB | measured GiB | ratio | reserved GiB "
        "| tokens/s | steps | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]


def _constants_checked(row: dict) -> str:
    """The constants of ``onpolicy`` that the row's planned generation time used (the planner's own lookups)."""
    profile = row["generation_profile"]
    if profile.lower() == "cpu":
        return '`DECODE_OVERHEAD_S["cpu"]` and `BANDWIDTH["cpu"]` (no GPU: not the GPU constants)'
    key = onpolicy.bandwidth_key(profile)
    bandwidth = f'`BANDWIDTH["{key}"]`' if key else f'`BANDWIDTH["T4"]` ({profile} has none)'
    if not row["generation_peak_flops"]:  # generation_plan then plans the weights' traffic alone
        bandwidth += f" (no peak_flops for {profile}: no compute bound in the plan)"
    return f'`DECODE_OVERHEAD_S["gpu"]` and {bandwidth}'


def _generation_table(rows: list[dict]) -> list[str]:
    """Planned vs measured seconds in ``generate`` of the rows that generated (none: no section)."""
    rows = [row for row in rows if row.get("generation_s_planned") is not None]
    if not rows:
        return []
    checked = "; ".join(sorted({_constants_checked(row) for row in rows}))
    lines = [
        "",
        "## On-policy generation: planned vs measured seconds in generate per optimizer step",
        "",
        'This is what checks `DECODE_OVERHEAD_S["gpu"]` and `BANDWIDTH` of `kagglekd/onpolicy.py` (the planner\'s '
        f"decode-time constants, not measured on a GPU before this check); this run checks {checked}. "
        "Measured = generation_share x step time (tokens / tokens_per_s) from the trainer's history, median over "
        "the steps after the first; planned = `onpolicy.generation_plan(config, gpu=<the run's device profile>, "
        "teacher_cfg, student_cfg)`.seconds_per_step, which assumes every prompt gets all max new tokens (the "
        "generated length is the mean per row up to its EOS; generate runs until every row ended).",
        "",
        "| variant | dtype | generation s measured | generation s planned | ratio | generated length | max new tokens "
        "| KV cache GiB (planned) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [row["id"], row["dtype"], _cell(row["generation_s_measured"]), _cell(row["generation_s_planned"])]
        cells += [_cell(row["generation_ratio"], 2), _cell(row["generated_length"], 1)]
        cells += [str(row["generation_new_tokens"]), _cell(row["generation_kv_cache_gib"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(out: Path, rows: list[dict], info: dict, args, elapsed: float) -> None:
    """``out`` (Markdown tables) and ``out`` with .json (every figure)."""
    lines = _header(info, args, elapsed)
    for row in rows:
        ok = row["status"] == "ok"
        cells = [row["id"], row["dtype"], row["status"]]
        cells += [_cell(row.get(k)) for k in ("planned_gib", "planned_comparable_gib", "measured_gib")]
        cells += [_cell(row.get("ratio"), 2), _cell(row.get("reserved_gib"))]
        cells += [f"{row['tokens_per_s']:.0f}" if ok and row["tokens_per_s"] else "", str(row.get("steps", ""))]
        cells.append(_note(row).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += _generation_table(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    payload = {"machine": info, "argv": args.argv, "tiny": args.tiny, "steps": args.steps, "seconds": elapsed,
               "rows": rows}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


# ---- main -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "GPU_RESULTS.md", help="Markdown table (+ .json)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (automatic without CUDA)")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default 4; tiny 2)")
    parser.add_argument("--accumulation", type=int, default=1, help="gradient_accumulation_steps (default 1)")
    parser.add_argument("--documents", type=int, help="stdlib-docs documents read (default 16; tiny 4)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no variant after this many seconds")
    parser.add_argument("--only", action="append", help="run only variant ids containing this text (repeatable)")
    parser.add_argument("--cpu-ddp", action="store_true", help="without GPUs, run the ddp rows on CPU (gloo)")
    parser.add_argument("--workdir", type=Path, help="where models and ddp specs go (default: a temp dir, removed)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one rank of a ddp variant (spec.json)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and not args.worker:
        args.tiny = True
    args.steps = args.steps or MODES["tiny" if args.tiny else "real"]["steps"]
    return args


def run_variant(variant: Variant, args, workdir: Path, cache: dict, remaining: float) -> dict:
    dirs = pair_dirs(variant.pair, workdir / "models", args.tiny, cache)
    config = variant_config(variant, dirs, workdir / "runs" / variant.slug, args)
    if variant.ddp:
        results = measure_ddp(variant, config, args, workdir, timeout=max(120.0, remaining + 120.0))
    else:
        results = [measure(config, variant.dtype, args.steps)]
    return make_row(variant, results, torch.cuda.is_available())


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        ddp_worker(args.worker)
        return []
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kagglekd-gpu-check-"))
    info, rows, cache = machine_info(), [], {}
    selected = [v for v in VARIANTS if not args.only or any(text in v.id for text in args.only)]
    try:
        for variant in selected:
            elapsed = time.perf_counter() - started
            reason = skip_reason(variant, info, args)
            if reason is None and elapsed > args.budget_s:
                reason = f"time budget: {elapsed:.0f} s > --budget-s {args.budget_s:g}; rerun with --only {variant.id}"
            if reason is not None:
                row = other_row(variant, "skipped", reason)
            else:
                print(f"[gpu_check] {variant.id} ...", flush=True)
                try:
                    row = run_variant(variant, args, workdir, cache, args.budget_s - elapsed)
                except Exception as err:  # recorded in the table; the next variant runs
                    row = other_row(variant, "error", error_note(err))
                release_memory()  # the exception (and the trainer its traceback held) is gone now
            rows.append(row)
            measured, plan = _cell(row.get("measured_gib")), _cell(row.get("planned_comparable_gib"))
            print(f"[gpu_check] {variant.id}: {row['status']} {measured} GiB measured, {plan} planned; "
                  f"{row.get('note') or ''}", flush=True)  # fmt: skip
            write_results(args.out, rows, info, args, time.perf_counter() - started)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
