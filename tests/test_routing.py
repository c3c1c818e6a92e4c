"""Tests of kagglekd.routing: token classes, the usage / balance / specialisation numbers, on real tiny MoEs.

References are computed here independently: entropies and mutual information from plain ``math`` over the
counts (I = H(E) - H(E | C), the chain-rule form, where the code uses the KL form), and the class frequencies
of the held-out tokens straight from the blocks.
"""

import math
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kagglekd import routing
from kagglekd.models import tiny_moe_config

VOCAB = 64
CLASSES = len(routing.TOKEN_CLASSES)


def _entropy(values) -> float:
    total = sum(values)
    return -sum(v / total * math.log(v / total) for v in values if v > 0)


def _mutual_information(counts: list[list[float]]) -> float:
    """I(C; E) = H(E) - sum_c P(c) H(E | C = c), over a [classes][experts] count table."""
    total = sum(map(sum, counts))
    usage = [sum(row[e] for row in counts) for e in range(len(counts[0]))]
    conditional = sum(sum(row) / total * _entropy(row) for row in counts if sum(row) > 0)
    return _entropy(usage) - conditional


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" def", "keyword"),
        ("return", "keyword"),
        (" the", "letters"),
        ("Ġx", "other"),  # a byte-level marker left in: not plain letters
        ("42", "digits"),
        (" 2024", "digits"),
        ("):", "punctuation"),
        (" ==", "punctuation"),
        ("\n    ", "whitespace"),
        ("", "whitespace"),
        ("x1", "other"),
        ("_name", "other"),
        ("<|endoftext|>", "other"),
        ("é", "other"),
    ],
)
def test_classify_token(text, expected):
    assert routing.classify_token(text) == expected


def test_token_class_table_of_the_demo_tokenizer(demo_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    table = routing.token_class_table(tokenizer, vocab_size=len(tokenizer) + 3)
    assert table.shape == (len(tokenizer) + 3,) and table[-3:].tolist() == [routing.TOKEN_CLASSES.index("other")] * 3
    for word, expected in ((" def", "keyword"), (" the", "letters"), ("(", "punctuation"), ("\n", "whitespace")):
        (token_id,) = tokenizer(word)["input_ids"]  # a single token of the demo vocabulary
        assert routing.TOKEN_CLASSES[table[token_id]] == expected
    present = set(table.tolist())
    assert {routing.TOKEN_CLASSES.index(name) for name in ("letters", "digits", "punctuation", "keyword")} <= present


def test_layer_statistics_match_independent_entropies():
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (CLASSES, 8), generator=generator).double()
    counts[5] = 0  # a class absent from the blocks
    stats = routing.layer_statistics(counts)
    table = counts.tolist()
    usage = [sum(row[e] for row in table) for e in range(8)]
    assert stats["usage"] == pytest.approx([u / sum(usage) for u in usage], abs=1e-4)
    assert stats["usage_entropy"] == pytest.approx(_entropy(usage), rel=1e-12)
    assert stats["balance"] == pytest.approx(_entropy(usage) / math.log(8), rel=1e-12)
    mutual_information = _mutual_information(table)
    assert stats["mutual_information"] == pytest.approx(mutual_information, rel=1e-9, abs=1e-12)
    class_entropy = _entropy([sum(row) for row in table])
    assert stats["specialisation"] == pytest.approx(mutual_information / min(class_entropy, _entropy(usage)))
    assert set(stats["class_usage"]) == set(routing.TOKEN_CLASSES[:5])  # the absent class is left out
    assert stats["class_usage"]["letters"] == pytest.approx([c / sum(table[0]) for c in table[0]], abs=1e-4)


def test_layer_statistics_endpoints():
    # independent routing (counts = outer product of marginals): no specialisation, whatever the balance
    independent = torch.outer(torch.tensor([5.0, 1, 3, 1, 2, 4]), torch.tensor([2.0, 1, 1, 4]))
    stats = routing.layer_statistics(independent)
    assert stats["mutual_information"] == pytest.approx(0.0, abs=1e-12) and stats["specialisation"] == pytest.approx(0)
    # every class to its own expert: the class determines the expert
    diagonal = torch.diag(torch.tensor([5.0, 1, 3, 1, 2, 4]))
    stats = routing.layer_statistics(diagonal)
    assert stats["specialisation"] == pytest.approx(1.0) and stats["balance"] < 1
    # fewer experts than classes, each class to one expert: still determined (I = H(expert) < H(class))
    grouped = torch.zeros(CLASSES, 2)
    grouped[:3, 0], grouped[3:, 1] = torch.tensor([5.0, 1, 3]), torch.tensor([1.0, 2, 4])
    stats = routing.layer_statistics(grouped)
    assert stats["mutual_information"] == pytest.approx(_entropy([9.0, 7.0]))
    assert stats["specialisation"] == pytest.approx(1)
    # every token to one expert: collapsed, balance 0, and no information either
    collapsed = torch.zeros(CLASSES, 4)
    collapsed[:, 2] = torch.tensor([5.0, 1, 3, 1, 2, 4])
    stats = routing.layer_statistics(collapsed)
    assert stats["balance"] == 0 and stats["specialisation"] == 0 and stats["usage"] == [0, 0, 1, 0]
    with pytest.raises(ValueError, match="no routed tokens"):
        routing.layer_statistics(torch.zeros(CLASSES, 4))


def _tiny_moe(experts_per_token: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = tiny_moe_config(VOCAB, num_experts=8, experts_per_token=experts_per_token)
        return AutoModelForCausalLM.from_config(config).float().eval()


def _blocks_and_classes() -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.randint(0, VOCAB, (5, 17), generator=torch.Generator().manual_seed(1))
    class_of_token = torch.arange(VOCAB) % CLASSES
    return blocks, class_of_token


def test_a_router_with_zero_weights_is_not_specialised():
    """Zero router weights give every token the same (uniform) router probabilities: the measure must say 0."""
    model = _tiny_moe(experts_per_token=2)
    blocks, class_of_token = _blocks_and_classes()
    random_report = routing.routing_report(model, blocks, class_of_token, batch_size=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
    report = routing.routing_report(model, blocks, class_of_token, batch_size=2)
    assert report["tokens"] == 5 * 16 and report["experts"] == 8 and report["experts_per_token"] == 2
    assert report["log_experts"] == pytest.approx(math.log(8))
    for layer in report["layers"]:
        assert layer["router_entropy"] == pytest.approx(1.0)  # softmax(0) is uniform: entropy log E
        assert layer["mutual_information"] == pytest.approx(0.0, abs=1e-12)
        assert layer["specialisation"] == pytest.approx(0.0, abs=1e-12)
    assert report["mean_specialisation"] == pytest.approx(0.0, abs=1e-12)
    # the randomly initialised routers do depend on the token: the measure is not always 0
    assert random_report["mean_specialisation"] > 0.01
    assert all(layer["router_entropy"] < 1 for layer in random_report["layers"])


def test_a_router_that_reads_the_token_class_is_fully_specialised():
    """Layer 0 built to route class c to expert c (top-1): specialisation 1, I = H(class) of the blocks."""
    model = _tiny_moe(experts_per_token=1)
    blocks, class_of_token = _blocks_and_classes()
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()  # layer 0's MLP sees the token's own embedding
        model.model.embed_tokens.weight.copy_(torch.nn.functional.one_hot(class_of_token, hidden).float())
        gate = model.model.layers[0].mlp.gate.weight
        gate.zero_()
        gate[torch.arange(CLASSES), torch.arange(CLASSES)] = 1.0  # expert c reads the class-c coordinate
    report = routing.routing_report(model, blocks, class_of_token, batch_size=2)
    first = report["layers"][0]
    input_classes = Counter(int(class_of_token[token]) for token in blocks[:, :-1].flatten())
    class_entropy = _entropy(list(input_classes.values()))
    assert first["layer"] == 0 and first["specialisation"] == pytest.approx(1.0)
    assert first["mutual_information"] == pytest.approx(class_entropy, rel=1e-9)
    for index, name in enumerate(routing.TOKEN_CLASSES):
        assert first["class_usage"][name] == [1.0 if expert == index else 0.0 for expert in range(8)]
        assert report["class_tokens"][name] == input_classes[index]
    assert first["usage"][CLASSES:] == [0.0, 0.0]  # experts 6 and 7 serve no class
    assert report["mean_specialisation"] < 1  # the untouched layers are not built to specialise


def test_routing_report_needs_an_moe_model():
    from kagglekd.models import tiny_dense_config

    dense = AutoModelForCausalLM.from_config(tiny_dense_config(VOCAB))
    blocks, class_of_token = _blocks_and_classes()
    with pytest.raises(ValueError, match="needs an MoE model"):
        routing.routing_report(dense, blocks, class_of_token)
