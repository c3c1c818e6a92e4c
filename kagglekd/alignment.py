"""How a teacher's and a student's vocabularies relate.

Token id i means the same token on both sides only when the tokenizers agree on it. Comparing logits of
unrelated vocabularies (or truncating the wider one to the narrower width) trains the student on noise,
so the kit classifies the pair before any logit is compared.
"""

from __future__ import annotations

from typing import Literal

VocabRelation = Literal["identical", "padded", "different"]


def classify_vocab_pair(teacher_tokenizer, student_tokenizer) -> VocabRelation:
    """``identical``: same token -> id map. ``padded``: one map is the other plus tokens with higher ids
    (added specials, unused rows), so ids below the smaller size mean the same token. ``different``:
    anything else -- logit KD needs an alignment, not a slice.
    """
    teacher = teacher_tokenizer.get_vocab()
    student = student_tokenizer.get_vocab()
    if teacher == student:
        return "identical"
    small, large = (teacher, student) if len(teacher) <= len(student) else (student, teacher)
    if all(large.get(token) == index for token, index in small.items()):
        if min(index for token, index in large.items() if token not in small) >= len(small):
            return "padded"
    return "different"
