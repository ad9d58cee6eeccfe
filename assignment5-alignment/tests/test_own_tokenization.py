import pytest
import torch

from cs336_alignment.testing import basics_tokenizer, hf_tokenizer
from cs336_alignment.text_tokenizer import BasicsTokenizer
from cs336_alignment.tokenization import tokenize_prompt_and_output

PROMPTS = ["Question 3: what is 3 plus 6?", "Hi", "The quick brown fox"]
OUTPUTS = [" Answer: 9.", " <think> reasoning </think> <answer> 1 </answer>", ""]


def _expected(tokenizer, bos: bool):
    """Concatenates the pieces by hand and shifts, one row at a time."""
    rows, masks = [], []
    for p, o in zip(PROMPTS, OUTPUTS, strict=True):
        p_ids = tokenizer.encode(p, add_special_tokens=False)
        if bos:
            p_ids = [tokenizer.bos_token_id, *p_ids]
        o_ids = tokenizer.encode(o, add_special_tokens=False)
        rows.append(p_ids + o_ids)
        masks.append([False] * len(p_ids) + [True] * len(o_ids))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([m + [False] * (width - len(m)) for m in masks])
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


@pytest.mark.parametrize("bos", [False, True])
def test_matches_hand_concatenation_with_our_hf_tokenizer(bos):
    tokenizer = hf_tokenizer(with_bos=bos)
    out = tokenize_prompt_and_output(PROMPTS, OUTPUTS, tokenizer)
    input_ids, labels, mask = _expected(tokenizer, bos)
    assert torch.equal(out["input_ids"], input_ids)
    assert torch.equal(out["labels"], labels)
    assert torch.equal(out["response_mask"], mask)
    assert out["response_mask"].dtype == torch.bool
    # Only the output tokens are marked: decoding the masked labels gives the outputs back.
    for row, text in enumerate(OUTPUTS):
        assert tokenizer.decode(out["labels"][row][out["response_mask"][row]]) == text


def test_basics_tokenizer_wrapper_works_too():
    tokenizer = BasicsTokenizer(basics_tokenizer())
    out = tokenize_prompt_and_output(PROMPTS[:2], OUTPUTS[:2], tokenizer)
    first = tokenizer.encode(PROMPTS[0]) + tokenizer.encode(OUTPUTS[0])
    assert out["input_ids"][0, : len(first) - 1].tolist() == first[:-1]
    assert out["response_mask"][0].sum() == len(tokenizer.encode(OUTPUTS[0]))


def test_bad_inputs_raise_one_line_errors():
    tokenizer = hf_tokenizer()
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        tokenize_prompt_and_output(["a", "b"], ["c"], tokenizer)
    with pytest.raises(ValueError, match="at least one"):
        tokenize_prompt_and_output([], [], tokenizer)
