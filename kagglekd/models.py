"""Load teacher / student models and tokenizers: hub ids, local paths, and the tiny offline presets.

Model references (the config fields ``teacher_model`` / ``student_model``):

* ``"tiny-random-moe"`` / ``"tiny-random-dense"``: a Qwen3-MoE / Llama model of the tiny shapes below with
  seeded random weights, saved once into the cache; for smoke tests.
* ``"tiny-moe"``: the tiny Qwen3-MoE of ``demo_teacher_config`` shape (8 experts, top-2) **pretrained** on the
  stdlib-docs corpus with the load-balancing loss (``pretrain_tiny_moe``): the embedded demo's teacher.
  Trained once (a few CPU minutes) and cached; its ``pretrain.json`` reports how it routes (``routing.py``).
* a local directory with a ``config.json`` (a Kaggle model / dataset mount, a checkpoint).
* a ``.gguf`` file, or ``registry:<name>`` for a GGUF shipped in a registry package (``gguf.REGISTRY_GGUF``:
  ``registry:smollm2`` is SmolLM2-135M-Instruct): converted once to a plain checkpoint (``gguf.model_dir``);
  as a tokenizer reference, only its tokenizer is converted (``gguf.tokenizer_dir``).
* anything else: a hub id, handed to ``from_pretrained`` (needs internet, or a populated HF cache).

Tiny models are built from the real ``transformers`` config classes and go through
``save_pretrained`` / ``from_pretrained``, so the real loading code runs everywhere.
Works on transformers 4.5x and 5.x.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3MoeConfig

from kagglekd import corpus, cputhreads, data, env, gguf, moe, rundir
from kagglekd.errors import ConfigError

logger = logging.getLogger(__name__)

TINY_RANDOM_MOE = "tiny-random-moe"
TINY_RANDOM_DENSE = "tiny-random-dense"
TINY_MOE = "tiny-moe"
TINY_MOE_8K = "tiny-moe-8k"
TINY_MODELS = (TINY_MOE, TINY_MOE_8K, TINY_RANDOM_MOE, TINY_RANDOM_DENSE)
# Tiny presets with a tokenizer of their own: (vocab size, pre-tokenizer of corpus.train_demo_tokenizer).
# tiny-moe-8k reads the same corpus through a different vocabulary: the cross-tokenizer demo's teacher.
OWN_TOKENIZERS = {TINY_MOE_8K: (8192, "bytelevel-digits")}

# The demo tokenizer's <|endoftext|> id (see corpus.train_demo_tokenizer).
DEMO_EOS_ID = 0

# ``dtype=`` replaced ``torch_dtype=`` in from_pretrained in 4.56; 5.x deprecates the old name.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"

# Pretraining recipe of the "tiny-moe" teacher. Bump _PRETRAIN_VERSION when it changes (new cache dir); the
# teacher's shape (demo_teacher_config) is hashed into the cache name as well.
# v2: 8 experts (was 4) and the load-balancing auxiliary loss, so that the experts specialise.
_PRETRAIN_VERSION = 2
PRETRAIN_STEPS = 600
PRETRAIN_MAX_LENGTH = 128
PRETRAIN_EVAL_FRACTION = 0.05
DEMO_TEACHER_EXPERTS = 8
DEMO_TEACHER_TOP_K = 2
DEMO_TEACHER_AUX_LOSS_COEF = 0.01


# ----------------------------------------------------------------------------- tiny configs


def tiny_moe_config(
    vocab_size: int = 4096,
    *,
    num_experts: int = 4,
    experts_per_token: int = 2,
    router_aux_loss_coef: float = 0.001,
) -> Qwen3MoeConfig:
    """The tiny Qwen3-MoE shape: 4 layers, 4 experts, top-2 routing (6.04 M parameters at 4096).

    hidden 256, 4 heads of 64 with 2 KV heads, every layer sparse (``decoder_sparse_step=1``, so the dense
    ``intermediate_size`` is unused), expert width 256, untied embeddings. ``tiny-random-moe`` (the tests'
    teacher) has these defaults; the demo teacher is ``demo_teacher_config``. ``router_aux_loss_coef``
    weighs the load-balancing loss in pretraining (``output_router_logits`` stays off: a distillation
    teacher need not return router logits).
    """
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        moe_intermediate_size=256,
        num_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        output_router_logits=False,
        router_aux_loss_coef=router_aux_loss_coef,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=DEMO_EOS_ID,
        eos_token_id=DEMO_EOS_ID,
    )


def demo_teacher_config(vocab_size: int = 4096) -> Qwen3MoeConfig:
    """The ``tiny-moe`` demo teacher's shape: ``tiny_moe_config`` with 8 experts, top-2 (9.18 M parameters at 4096).

    Twice the experts of ``tiny-random-moe`` at the same active width (2 x 256 per token), pretrained with
    the load-balancing loss at 0.01: enough experts, all in use, for routing to matter to SAR and KA.
    """
    return tiny_moe_config(
        vocab_size,
        num_experts=DEMO_TEACHER_EXPERTS,
        experts_per_token=DEMO_TEACHER_TOP_K,
        router_aux_loss_coef=DEMO_TEACHER_AUX_LOSS_COEF,
    )


def tiny_dense_config(vocab_size: int = 4096) -> LlamaConfig:
    """The demo student's shape: a 3-layer Llama, hidden 96, tied embeddings (0.64 M parameters at 4096).

    4 heads of 24 with 2 KV heads, MLP width 192. No ``pad_token_id``: it would freeze that embedding row.
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        intermediate_size=192,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=DEMO_EOS_ID,
        eos_token_id=DEMO_EOS_ID,
    )


def _seeded_model(config, seed: int) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config`` with a fixed seed, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.float()


def tiny_random_moe(vocab_size: int = 4096, seed: int = 0) -> torch.nn.Module:
    """A ``Qwen3MoeForCausalLM`` of ``tiny_moe_config`` shape with seeded random weights."""
    return _seeded_model(tiny_moe_config(vocab_size), seed)


def tiny_random_dense(vocab_size: int = 4096, seed: int = 0) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of ``tiny_dense_config`` shape with seeded random weights."""
    return _seeded_model(tiny_dense_config(vocab_size), seed)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- resolving references


def _model_field(role: str | None) -> str:
    return f"{role}_model" if role else "teacher_model/student_model"


def _save_with_tokenizer(
    model: torch.nn.Module, vocab_size: int, out_dir: Path, pre_tokenizer: str = "bytelevel"
) -> None:
    """``save_pretrained`` the model and the demo tokenizer into ``out_dir``."""
    tokenizer = AutoTokenizer.from_pretrained(corpus.demo_tokenizer(vocab_size, pre_tokenizer=pre_tokenizer))
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"demo tokenizer has {len(tokenizer)} tokens, more than vocab_size {vocab_size}.")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def resolve_model(
    name_or_path: str | os.PathLike, *, vocab_size: int = 4096, seed: int = 0, role: str | None = None
) -> Path | str:
    """Turn a model reference into something ``from_pretrained`` takes: a local directory or a hub id.

    Tiny presets are built (or pretrained) once into ``cache_root()/models`` and returned from there;
    a GGUF reference is converted once into ``cache_root()/gguf`` (``gguf.model_dir``); a local directory
    is returned as is (it must hold a ``config.json``); anything else is returned unchanged as a hub id.
    ``role`` ("teacher" / "student") names the config field in errors.
    """
    reference = os.fspath(name_or_path)
    if reference in (TINY_RANDOM_MOE, TINY_RANDOM_DENSE):
        out_dir = corpus.cache_root() / "models" / f"{reference}-v{vocab_size}-s{seed}"
        if not (out_dir / "config.json").exists():
            build = tiny_random_moe if reference == TINY_RANDOM_MOE else tiny_random_dense
            with corpus.staged_directory(out_dir) as staging:
                _save_with_tokenizer(build(vocab_size, seed), vocab_size, staging)
            logger.info("Saved %s to %s", reference, out_dir)
        return out_dir
    if reference == TINY_MOE:
        # One fixed artifact, like a hub model: never re-pretrained per run seed. Its held-out documents are
        # those of split seed 0, which is why DistillConfig.split_seed is kept apart from seed.
        return pretrain_tiny_moe(vocab_size=vocab_size, seed=0)
    if reference in OWN_TOKENIZERS:
        own_vocab, pre_tokenizer = OWN_TOKENIZERS[reference]
        return pretrain_tiny_moe(vocab_size=own_vocab, seed=0, pre_tokenizer=pre_tokenizer)
    if gguf.is_gguf_reference(reference):  # a .gguf file or registry:<name>: converted once, cached
        return gguf.model_dir(reference, _model_field(role))
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{_model_field(role)} points to {path}, which has no config.json. Give the directory that "
                "holds config.json and the weights (look one level down in a Kaggle model mount).",
                field=_model_field(role),
            )
        return path
    if path.exists() or reference.startswith(("/", ".", "~")) or reference.count("/") > 1:
        raise ConfigError(
            f"{_model_field(role)} = {reference!r} looks like a local path but is not a directory. "
            "Give the directory that holds config.json and the weights.",
            field=_model_field(role),
        )
    return reference


def _offline_model_error(reference: str, field: str, err: Exception) -> ConfigError:
    return ConfigError(
        f"Could not load {field} {reference!r}: {type(err).__name__}: {err}. Kaggle kernels usually run "
        "offline: attach the model as a Kaggle model or dataset (Add Input) and set "
        f"`{field}` to its local directory under /kaggle/input, or use one of {', '.join(TINY_MODELS)}.",
        field=field,
    )


def load_model(
    name_or_path: str | os.PathLike,
    *,
    role: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    vocab_size: int = 4096,
    seed: int = 0,
) -> torch.nn.Module:
    """Load a causal LM for ``role`` ("teacher" or "student") onto ``device``.

    ``dtype=None`` means float32 on both transformers lines (5.x would otherwise keep the checkpoint's
    dtype). The teacher comes back in eval mode with ``requires_grad=False`` on every parameter; the
    student in train mode. A hub id that cannot be loaded (offline) raises ConfigError naming the field.
    """
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    field = _model_field(role)
    resolved = resolve_model(name_or_path, vocab_size=vocab_size, seed=seed, role=role)
    kwargs = {_DTYPE_KWARG: dtype or torch.float32}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as err:
        if isinstance(resolved, Path):
            raise
        raise _offline_model_error(str(resolved), field, err) from err
    model.to(device)
    if role == "teacher":
        model.eval()
        model.requires_grad_(False)
    else:
        model.train()
    logger.info(
        "Loaded %s %s (%s, %.2f M parameters) on %s in %s",
        role, name_or_path, type(model).__name__, count_parameters(model) / 1e6, device, model.dtype,
    )  # fmt: skip
    return model


def load_tokenizer(name_or_path: str | os.PathLike, *, vocab_size: int = 4096, field: str = "tokenizer"):
    """``AutoTokenizer`` for a model reference; tiny-* names give the demo tokenizer.

    A tokenizer without a pad token gets ``pad = eos`` (packing needs no padding; this only keeps
    padding-based utilities working). Hub failures raise ConfigError naming ``field``.
    """
    reference = os.fspath(name_or_path)
    if reference in OWN_TOKENIZERS:
        own_vocab, pre_tokenizer = OWN_TOKENIZERS[reference]
        source: Path | str = corpus.demo_tokenizer(own_vocab, pre_tokenizer=pre_tokenizer)
    elif reference in TINY_MODELS:
        source = corpus.demo_tokenizer(vocab_size)
    elif gguf.is_gguf_reference(reference):
        source = gguf.tokenizer_dir(reference, field)
    else:
        source = Path(reference).expanduser() if Path(reference).expanduser().is_dir() else reference
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        if isinstance(source, Path):
            raise
        raise _offline_model_error(reference, field, err) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("Tokenizer %s has no pad token; using eos %r as pad", reference, tokenizer.eos_token)
    return tokenizer


# ----------------------------------------------------------------------------- precision


def precision_for(device: str | torch.device, capability: tuple[int, int] | None = None) -> dict:
    """Mixed-precision plan for a device.

    ==================  ==============  ===============  =============  =============
    device              autocast_dtype  use_grad_scaler  teacher_dtype  student_dtype
    ==================  ==============  ===============  =============  =============
    CPU / other         None            False            float32        float32
    CUDA cc >= 8.0      bfloat16        False            bfloat16       float32
    CUDA cc <  8.0      float16         True             float16        float32
    ==================  ==============  ===============  =============  =============

    bf16 is gated on compute capability, never ``torch.cuda.is_bf16_supported()`` (True on a T4, which
    only emulates it). The student keeps float32 master weights. ``capability`` overrides the query
    (so the table can be tested on CPU); giving it implies a CUDA device.
    """
    device = torch.device(device)
    if device.type != "cuda" and capability is None:
        return {
            "autocast_dtype": None,
            "use_grad_scaler": False,
            "teacher_dtype": torch.float32,
            "student_dtype": torch.float32,
        }
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if tuple(capability) >= (8, 0):
        return {
            "autocast_dtype": torch.bfloat16,
            "use_grad_scaler": False,
            "teacher_dtype": torch.bfloat16,
            "student_dtype": torch.float32,
        }
    return {
        "autocast_dtype": torch.float16,
        "use_grad_scaler": True,
        "teacher_dtype": torch.float16,
        "student_dtype": torch.float32,
    }


# ----------------------------------------------------------------------------- tiny teacher pretraining


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """exp(token-weighted mean next-token cross-entropy) of ``model`` over ``[N, L + 1]`` blocks."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        input_ids, labels = data.next_token_batch(blocks[start : start + batch_size])
        logits = model(input_ids=input_ids).logits.float()
        total_loss += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
        total_tokens += labels.numel()
    model.train(was_training)
    return math.exp(total_loss / max(total_tokens, 1))


def _train_cross_entropy(
    model: torch.nn.Module,
    train_blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    seed: int,
    desc: str,
) -> dict:
    """Plain next-token CE training: AdamW, cosine schedule with warmup, clip 1.0, seeded batch order.

    An MoE model (``moe.moe_info``) trains on CE + ``config.router_aux_loss_coef`` x its load-balancing loss
    (the model's own ``aux_loss`` with ``output_router_logits=True``: Switch-Transformer's E * sum_e f_e P_e,
    1 at perfect balance), which keeps every expert in use so that the experts can specialise.
    Returns the last step's ``{"loss": CE, "aux_loss": load-balancing loss or None}``. Used to pretrain the
    tiny teacher (the distillation trainer lives in ``trainer.py``).
    """
    if steps < 1:
        raise ConfigError(f"pretraining needs at least 1 step, got {steps}.")
    aux_coef = getattr(model.config, "router_aux_loss_coef", 0.0) if moe.moe_info(model).is_moe else None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = transformers.get_scheduler("cosine", optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(len(train_blocks), generator=generator), 0
    progress = env.progress_bar()(range(steps), desc=desc, unit="step")
    for step in progress:
        if position + batch_size > len(order):  # next epoch: a fresh seeded order
            order, position = torch.randperm(len(train_blocks), generator=generator), 0
        input_ids, labels = data.next_token_batch(train_blocks[order[position : position + batch_size]])
        position += batch_size
        if aux_coef is None:
            output, aux_loss = model(input_ids=input_ids), None
        else:
            output = model(input_ids=input_ids, output_router_logits=True)
            aux_loss = output.aux_loss
        loss = torch.nn.functional.cross_entropy(output.logits.flatten(0, 1).float(), labels.flatten())
        optimizer.zero_grad(set_to_none=True)
        (loss if aux_loss is None else loss + aux_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if (step + 1) % 100 == 0 or step + 1 == steps:
            aux_text = "" if aux_loss is None else f" load-balancing {aux_loss.item():.4f}"
            logger.info("%s step %d/%d loss %.4f%s", desc, step + 1, steps, loss.item(), aux_text)
    model.eval()
    return {"loss": loss.item(), "aux_loss": None if aux_loss is None else aux_loss.item()}


# The teacher-config fields hashed into the pretrained teacher's cache name (its shape and routing recipe).
_RECIPE_CONFIG_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "moe_intermediate_size", "num_experts", "num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef",
    "tie_word_embeddings",
)  # fmt: skip


def pretrain_tiny_moe(
    *,
    vocab_size: int = 4096,
    seed: int = 0,
    steps: int = PRETRAIN_STEPS,
    batch_size: int = 16,
    lr: float = 2e-3,
    warmup_steps: int | None = None,
    max_length: int = PRETRAIN_MAX_LENGTH,
    eval_fraction: float = PRETRAIN_EVAL_FRACTION,
    pre_tokenizer: str = "bytelevel",
    teacher_config: Qwen3MoeConfig | None = None,
) -> Path:
    """Pretrain the tiny Qwen3-MoE teacher on stdlib-docs once; return its cached directory.

    ``teacher_config`` defaults to ``demo_teacher_config(vocab_size)``; its shape and routing fields
    (``_RECIPE_CONFIG_KEYS``) are hashed into the cache name with the recipe. Loss: next-token CE plus
    ``router_aux_loss_coef`` x the load-balancing loss (``_train_cross_entropy``). AdamW + cosine schedule
    with warmup (``transformers.get_scheduler``), gradient clipping at 1.0, seeded initialisation and batch
    order. The teacher trains only on the train split of ``build_blocks(seed=seed, eval_fraction=eval_fraction)``:
    distil with the same seed and eval fraction so the student's eval documents stay unseen by the teacher.
    The directory holds the model, the demo tokenizer and ``pretrain.json`` (steps, seconds, eval perplexity,
    data fingerprint, and ``routing``: how the experts are used on the held-out blocks, ``routing.py``).
    A second call with the same arguments returns the directory at once.
    """
    config = teacher_config if teacher_config is not None else demo_teacher_config(vocab_size)
    shape = {key: getattr(config, key) for key in _RECIPE_CONFIG_KEYS}
    recipe = [_PRETRAIN_VERSION, batch_size, lr, warmup_steps, max_length, eval_fraction, shape]
    out_dir = corpus.cache_root() / "models" / _pretrained_name(recipe, vocab_size, seed, steps, pre_tokenizer)
    if (out_dir / "pretrain.json").exists():
        return out_dir

    tokenizer = AutoTokenizer.from_pretrained(corpus.demo_tokenizer(vocab_size, pre_tokenizer=pre_tokenizer))
    texts = data.load_texts(data.STDLIB_DATASET)
    blocks = data.build_blocks(
        texts, tokenizer, max_length=max_length, eval_fraction=eval_fraction, seed=seed,
        source=data.STDLIB_DATASET,
    )  # fmt: skip
    model = _seeded_model(config, seed)
    cputhreads.keep_freed_memory()  # each step's large tensors reuse freed memory (a CPU run; see cputhreads)
    logger.info(
        "Pretraining %s: %.2f M parameters, %d experts top-%d, %d steps of %d x %d tokens", TINY_MOE,
        count_parameters(model) / 1e6, config.num_experts, config.num_experts_per_tok, steps, batch_size, max_length,
    )  # fmt: skip
    started = time.perf_counter()
    warmup = warmup_steps if warmup_steps is not None else max(1, steps // 20)
    final = _train_cross_entropy(
        model, blocks.train, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup, seed=seed,
        desc=f"pretrain {TINY_MOE}",
    )  # fmt: skip
    seconds = time.perf_counter() - started
    report = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup,
        "max_length": max_length,
        "seed": seed,
        "eval_fraction": eval_fraction,
        "pre_tokenizer": pre_tokenizer,
        "recipe_version": _PRETRAIN_VERSION,
        "teacher_config": shape,
        "seconds": round(seconds, 1),
        **_held_out_report(model, tokenizer, blocks.eval),
        "final_train_loss": final["loss"],
        "final_train_aux_loss": final["aux_loss"],
        "parameters": count_parameters(model),
        "data_fingerprint": data.dataset_fingerprint(
            source=data.STDLIB_DATASET,
            tokenizer=tokenizer,
            max_length=max_length,
            eval_fraction=eval_fraction,
            seed=seed,
        ),  # fmt: skip
        "data": blocks.info,
    }
    with corpus.staged_directory(out_dir) as staging:
        _save_with_tokenizer(model, vocab_size, staging, pre_tokenizer)
        (staging / "pretrain.json").write_text(rundir.to_json_text(report), encoding="utf-8")
    return out_dir


def _pretrained_name(recipe: list, vocab_size: int, seed: int, steps: int, pre_tokenizer: str) -> str:
    """Cache directory name of a pretrained teacher: its vocabulary, seed, steps and a hash of the recipe."""
    recipe_hash = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    spelled = "" if pre_tokenizer == "bytelevel" else f"-{pre_tokenizer}"
    return f"{TINY_MOE}{spelled}-v{vocab_size}-s{seed}-n{steps}-{recipe_hash}"


def _held_out_report(model: torch.nn.Module, tokenizer, eval_blocks: torch.Tensor) -> dict:
    """``{"eval_perplexity", "routing"}`` of the pretrained teacher on its held-out ``[N, L + 1]`` blocks."""
    from kagglekd import routing

    eval_ppl = evaluate_perplexity(model, eval_blocks)
    report = routing.routing_report(model, eval_blocks, routing.token_class_table(tokenizer, model.config.vocab_size))
    logger.info(
        "Pretrained %s: eval perplexity %.2f; routing balance %.3f, specialisation %.3f (mean over layers)",
        TINY_MOE, eval_ppl, report["mean_balance"], report["mean_specialisation"],
    )  # fmt: skip
    return {"eval_perplexity": eval_ppl, "routing": report}


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing under the name each transformers line has (5.x renamed it)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4.5x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
