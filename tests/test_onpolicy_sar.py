"""SAR on generated (on-policy / seq_kd) micro-batches: what the teacher's regularisers read and how they weigh.

A generated micro-batch is a data block's prompt followed by sampled tokens. The teacher's CE must cover the real
data only (the prompt's own targets), the balance the positions up to each row's end, and the router term must
weigh each counted target (the generated ones) as a data block weighs its own. References are written here: a
plain ``F.cross_entropy`` of the teacher's logits, router drift and the Switch balance from the gate modules,
found without ``moe.find_routers``; causal attention lets a forward on each row's prefix stand in for a mask.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN
from test_alignment_training import permuted_teacher  # noqa: F401  (fixture)
from test_onpolicy import reference_labels

from kagglekd.config import DistillConfig
from kagglekd.losses import IGNORE_INDEX
from kagglekd.trainer import Distiller

pytestmark = pytest.mark.usefixtures("use_kit_cache")

NO_REGULARISERS = dict(sar_anchor_weight=0.0, sar_balance_weight=0.0, sar_entropy_weight=0.0, sar_teacher_ce_weight=0.0)
PROMPT = 9


def sar_run(tmp_path, **weights) -> Distiller:
    config = DistillConfig.from_dict({**TINY_RUN, "output_dir": str(tmp_path / "run"), "alpha_ce": 0.0, "sar": True,
                                      "lmbda": 1.0, "prompt_length": PROMPT, "batch_size": 2, "max_steps": 2,
                                      **NO_REGULARISERS, **weights})  # fmt: skip
    return Distiller(config).setup()


def _gates(model):
    """The routers, found independently of moe.find_routers: the ``gate`` module of every sparse block."""
    return [m for name, m in model.named_modules() if name.endswith("mlp.gate")]


def generated_batch(distiller, seed=0, eos_at=4, sampled=True):
    """``(sequences [2, L + 1], labels)``: two train blocks' prompts followed by random non-EOS tokens (``sampled``;
    else the blocks' own text); row 0 ends with an EOS ``eos_at`` tokens into its continuation and is padded with
    EOS after it (as ``generate`` pads)."""
    blocks = distiller.blocks.train[:2].clone()
    eos, vocab = distiller.tokenizer.eos_token_id, len(distiller.tokenizer)
    gen = torch.Generator().manual_seed(seed)
    tail = torch.randint(0, vocab, blocks[:, PROMPT:].shape, generator=gen) if sampled else blocks[:, PROMPT:]
    tail[tail == eos] = (eos + 1) % vocab
    tail[0, eos_at:] = eos
    sequences = torch.cat([blocks[:, :PROMPT], tail], 1)
    return sequences, reference_labels(sequences, PROMPT, eos)


def counted(labels) -> int:
    return int((labels != IGNORE_INDEX).sum())


def test_teacher_ce_covers_only_the_prompt_and_ignores_the_generated_tokens(tmp_path):
    distiller = sar_run(tmp_path, sar_teacher_ce_weight=1.0)
    sequences, labels = generated_batch(distiller)
    num_items = counted(labels) + 40  # the window also holds other micro-batches
    out = distiller.teacher_side.outputs(sequences, num_items, generated=labels)
    with torch.no_grad():
        logits = distiller.teacher(input_ids=sequences[:, :-1]).logits
    # the prompt's own next tokens: positions 0 .. PROMPT - 2, a mean over them
    ce = F.cross_entropy(logits[:, : PROMPT - 1].double().flatten(0, 1), sequences[:, 1:PROMPT].flatten())
    assert float(out.router.detach()) == pytest.approx(float(ce) * counted(labels) / num_items, rel=1e-5)

    other, other_labels = generated_batch(distiller, seed=1)  # other sampled tokens, the same rows' ends
    assert not torch.equal(other, sequences) and torch.equal(other[:, :PROMPT], sequences[:, :PROMPT])
    assert counted(other_labels) == counted(labels)
    again = distiller.teacher_side.outputs(other, num_items, generated=other_labels)
    assert float(again.router.detach()) == pytest.approx(float(out.router.detach()), rel=1e-6)


def test_router_term_weighs_a_generated_target_like_a_data_target(tmp_path):
    """Anchor only (position-free): each micro-batch's term is drift x its counted targets / the window's count, so
    a window of a generated micro-batch and a data block sums to the drift, as an all-data window does."""
    distiller = sar_run(tmp_path, sar_anchor_weight=1.0)
    gates = _gates(distiller.teacher)
    initial = [g.weight.detach().clone().double() for g in gates]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in gates:
            gate.weight += 0.05 * torch.randn(gate.weight.shape, generator=gen)
    drift = sum(((g.weight.double() - w0) ** 2).sum() for g, w0 in zip(gates, initial))
    drift = float(drift / sum((w0**2).sum() for w0 in initial))
    assert drift > 1e-4

    sequences, labels = generated_batch(distiller)
    block = distiller.blocks.train[2:4]
    generated_targets, data_targets = counted(labels), block.shape[0] * (block.shape[1] - 1)
    num_items = generated_targets + data_targets
    assert generated_targets < labels.numel() / 2  # the prompt and the padding are not counted
    generated = distiller.teacher_side.outputs(sequences, num_items, generated=labels).router
    data_term = distiller.teacher_side.outputs(block, num_items).router
    assert float(generated.detach()) == pytest.approx(drift * generated_targets / num_items, rel=1e-5)
    assert float(data_term.detach()) == pytest.approx(drift * data_targets / num_items, rel=1e-5)
    assert float((generated + data_term).detach()) == pytest.approx(drift, rel=1e-5)


def test_a_generated_window_carries_the_router_term_once_through_the_trainer(tmp_path):
    """lmbda 1, two generated micro-batches per step: the window's router component is the drift itself."""
    distiller = sar_run(tmp_path, sar_anchor_weight=1.0, gradient_accumulation_steps=2)
    gates = _gates(distiller.teacher)
    initial = [g.weight.detach().clone().double() for g in gates]
    with torch.no_grad():
        for gate in gates:
            gate.weight.mul_(1.1)
    drift = float(sum(((g.weight.double() - w0) ** 2).sum() for g, w0 in zip(gates, initial)))
    drift /= float(sum((w0**2).sum() for w0 in initial))
    assert drift == pytest.approx(0.01, rel=1e-4)
    sums = distiller._train_step(next(distiller._windows(0)), apply=False)
    assert sums["tokens"] < 2 * 2 * TINY_RUN["max_length"]  # generated targets only: the window did generate
    assert sums["router"] == pytest.approx(drift, rel=1e-5)


def _switch_balance(layer_logits: list[torch.Tensor], own_k: int) -> float:
    """E * sum_e f_e P_e over the given router logits ``[tokens, E]`` per layer, mean over layers, float64."""
    values = []
    for logits in layer_logits:
        probs = F.softmax(logits.double(), dim=-1)
        picks = probs.topk(own_k, dim=-1).indices.reshape(-1)
        fraction = torch.bincount(picks, minlength=probs.shape[-1]).double() / picks.numel()
        values.append(probs.shape[-1] * (fraction * probs.mean(0)).sum())
    return float(torch.stack(values).mean())


def test_balance_reads_the_prompt_and_the_generated_tokens_up_to_each_rows_end(tmp_path):
    """The reference runs each row's prefix alone (positions 0 .. its EOS target): the padding never enters."""
    distiller = sar_run(tmp_path, sar_balance_weight=1.0)
    sequences, labels = generated_batch(distiller, eos_at=2)
    num_items = counted(labels)
    out = distiller.teacher_side.outputs(sequences, num_items, generated=labels)
    ends = [int((row != IGNORE_INDEX).nonzero().max()) for row in labels]  # the last counted target's position
    assert ends[0] < labels.shape[1] - 1 == ends[1]
    gates = _gates(distiller.teacher)
    prefixes, whole = {i: [] for i in range(len(gates))}, {i: [] for i in range(len(gates))}
    record = {"into": prefixes}
    hooks = [g.register_forward_hook(lambda m, a, o, i=i: record["into"][i].append(o[0] if isinstance(o, tuple) else o))
             for i, g in enumerate(gates)]  # fmt: skip
    try:
        with torch.no_grad():
            for row, end in zip(sequences, ends):
                distiller.teacher(input_ids=row[None, : end + 1])
            record["into"] = whole
            distiller.teacher(input_ids=sequences[:, :-1])
    finally:
        for hook in hooks:
            hook.remove()
    own_k = distiller.teacher_side.own_top_k
    balance = _switch_balance([torch.cat(prefixes[i]) for i in sorted(prefixes)], own_k)
    assert float(out.router.detach()) == pytest.approx(balance, rel=1e-5)
    # the padding would change it: the case tells the two apart
    assert abs(balance - _switch_balance([whole[i][0] for i in sorted(whole)], own_k)) > 1e-4


def test_across_tokenizers_the_scope_is_the_same_text(tmp_path, permuted_teacher):  # noqa: F811
    """A teacher whose vocabulary is a permutation of the student's reads the same tokens under other ids: through
    the cross-tokenizer path (its own positions, ``onpolicy.teacher_scope``) its CE and balance on a generated
    micro-batch equal the same-tokenizer teacher's. The continuation is real text (the blocks' own), which the
    teacher's tokenizer splits as the student's did; random ids would be re-split."""
    weights = dict(sar_teacher_ce_weight=1.0, sar_balance_weight=1.0)
    plain = sar_run(tmp_path / "plain", **weights)
    cross = Distiller(plain.config.replace(output_dir=str(tmp_path / "cross"), teacher_model=str(permuted_teacher),
                                           cross_tokenizer=True)).setup()  # fmt: skip
    assert cross.cross is not None
    sequences, labels = generated_batch(plain, eos_at=3, sampled=False)
    num_items = counted(labels)
    want = plain.teacher_side.outputs(sequences, num_items, generated=labels).router.detach()
    got = cross.teacher_side.outputs(sequences, num_items, generated=labels).router.detach()
    assert float(got) == pytest.approx(float(want), rel=1e-5)
