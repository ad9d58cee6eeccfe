"""Tiny offline stand-ins for tests and smoke runs of the training loops (nothing is downloaded): a BPE trained
by cs336_basics on a built-in corpus and exposed as a transformers fast tokenizer (optionally with a Llama-style
BOS), and random-weight Llama, GPT-2 and cs336_basics models. Kept in the package because pytest's shared
`tests` package name across the workspace rules out a test-side helper module."""

from functools import cache
from pathlib import Path

import torch

from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_basics.tokenizer import Tokenizer, train_bpe
from cs336_basics.tokenizer.serialization import token_to_str

EOS = "<|endoftext|>"
BOS = "<|begin_of_text|>"
CORPUS = "\n".join(
    f"Question {i}: what is {i} plus {i + 3}? Answer: {2 * i + 3}. The quick brown fox jumps over the lazy dog. "
    f"<think> reasoning </think> <answer> {i} </answer> Below is an instruction that describes a task."
    for i in range(60)
)


@cache
def bpe_vocab_and_merges(vocab_size: int = 400) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.txt"
        path.write_text(CORPUS, encoding="utf-8")
        return train_bpe(path, vocab_size, [EOS], num_workers=1)


def basics_tokenizer() -> Tokenizer:
    vocab, merges = bpe_vocab_and_merges()
    return Tokenizer(vocab, merges, [EOS])


def hf_tokenizer(with_bos: bool = False):
    """Our BPE as a `PreTrainedTokenizerFast`; `with_bos` prepends a BOS like Llama 3's tokenizer does."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = bpe_vocab_and_merges()
    str_vocab = {token_to_str(b): i for i, b in vocab.items()}
    str_merges = [(token_to_str(a), token_to_str(b)) for a, b in merges]
    raw = RawTokenizer(models.BPE(vocab=str_vocab, merges=str_merges))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    special = [EOS] + ([BOS] if with_bos else [])
    raw.add_special_tokens(special)
    if with_bos:
        bos_id = raw.token_to_id(BOS)
        raw.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    kwargs = {"bos_token": BOS} if with_bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS, pad_token=EOS, **kwargs)


def tiny_llama(vocab_size: int, seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, attn_implementation="eager",
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(vocab_size: int, seed: int = 0):
    """Learned absolute positions: left padding is only right if position ids start at each real token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


def tiny_basics_lm(vocab_size: int, seed: int = 0, context_length: int = 128) -> TransformerLM:
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=vocab_size, context_length=context_length, d_model=32, num_layers=2,
                               num_heads=4, d_ff=64)
    return TransformerLM(config).eval()


def write_tiny_run(root: Path) -> Path:
    """A saved tiny cs336_basics run (`run/checkpoint.pt`, tokenizer in `tok/`) and small SFT (`sft.jsonl`),
    MATH-style (`math.jsonl`) and preference (`pairs.jsonl`) data: what the loop CLIs read, offline."""
    import json

    from cs336_basics.checkpoint import save_checkpoint
    from cs336_basics.tokenizer import save_tokenizer

    root = Path(root)
    vocab, merges = bpe_vocab_and_merges()
    save_tokenizer(vocab, merges, root / "tok")
    lm = tiny_basics_lm(len(vocab) + 1, context_length=320)
    save_checkpoint(lm, torch.optim.SGD(lm.parameters(), lr=0.1), 0, root / "run" / "checkpoint.pt",
                    extra={"model_config": lm.config.to_dict()})
    rows = {
        "sft.jsonl": [{"prompt": f"Question {i}: what is {i} plus 3?", "response": f" Answer: {i + 3}."}
                      for i in range(4)],
        "math.jsonl": [{"problem": f"what is {i} plus 3?", "answer": str(i + 3)} for i in range(4)],
        "pairs.jsonl": [{"prompt": f"what is {i} plus 3?", "chosen": f"{i + 3}.", "rejected": "The fox."}
                        for i in range(4)],
    }
    for name, records in rows.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root
