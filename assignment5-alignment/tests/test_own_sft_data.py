import json

import pytest
import torch

from cs336_alignment.prompts import load_prompt
from cs336_alignment.sft_data import PackedSFTDataset, iterate_batches, pack_token_stream
from cs336_alignment.testing import hf_tokenizer


def test_pack_token_stream_matches_handout_example():
    inputs, labels = pack_token_stream([list(range(11))], 4)
    assert inputs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert labels.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    inputs, labels = pack_token_stream([[0, 1, 2], [3, 4, 5, 6, 7, 8]], 4)  # 9 tokens: 8 are inputs, 1 label
    assert inputs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and labels[-1].tolist() == [5, 6, 7, 8]
    assert pack_token_stream([[0, 1, 2, 3]], 4)[0].shape == (0, 4)  # no next token for the last label


def _write(tmp_path, n=12):
    rows = [{"prompt": f"Question {i}: what is {i} plus {i + 3}?", "response": f"Answer: {2 * i + 3}."}
            for i in range(n)]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, rows


def test_packed_dataset_equals_brute_force_stream_with_bos_and_eos(tmp_path):
    tokenizer = hf_tokenizer(with_bos=True)
    path, rows = _write(tmp_path)
    template = load_prompt("alpaca_sft")
    stream = []
    for r in rows:  # BOS + Alpaca document + EOS, as with Llama 3
        text = template.replace("{instruction}", r["prompt"]).replace("{response}", r["response"])
        stream += [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    dataset = PackedSFTDataset(tokenizer, path, seq_length=16, shuffle=False)
    assert len(dataset) == (len(stream) - 1) // 16
    for i, example in enumerate(dataset):
        assert example["input_ids"].tolist() == stream[16 * i : 16 * i + 16]
        assert example["labels"].tolist() == stream[16 * i + 1 : 16 * i + 17]
    shuffled = PackedSFTDataset(tokenizer, path, seq_length=16, shuffle=True, seed=0)
    assert len(shuffled) == len(dataset)
    assert sorted(shuffled.input_ids.flatten().tolist()) != shuffled.input_ids.flatten().tolist()
    assert not torch.equal(shuffled.input_ids, dataset.input_ids)


def test_iterate_batches_is_one_epoch(tmp_path):
    path, _ = _write(tmp_path, n=30)
    dataset = PackedSFTDataset(hf_tokenizer(), path, seq_length=8, shuffle=False)
    loader = iterate_batches(dataset, batch_size=5, shuffle=True, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == -(-len(dataset) // 5)
    seen = torch.cat([b["input_ids"] for b in batches])
    assert all(b["input_ids"].shape == (5, 8) for b in batches[:-1]) and seen.dtype == torch.long
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, dataset.input_ids.tolist()))


def test_bad_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="lacks the 'response' field"):
        PackedSFTDataset(hf_tokenizer(), bad, 8, False)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not valid JSON"):
        PackedSFTDataset(hf_tokenizer(), bad, 8, False)
