"""What the commands leave behind and read back: tokenizer folders, trained runs, figure paths.

`cli` (every subcommand) and `quickstart` (the whole pipeline in one command) both need these; they live
here so that neither imports the other. torch is imported only inside the functions that load a model.
"""

import json
import os
import zipfile

from cs336_basics.cli_support import UserError, reading

DEFAULT_SPECIAL = "<|endoftext|>"


def figure_path(path: str) -> str:
    """Where a figure asked for at `path` goes: inside it as loss.png when it is a folder, `.png` added when it
    has no extension (matplotlib would add it itself, behind our back)."""
    if os.path.isdir(path):
        return os.path.join(path, "loss.png")
    return path if os.path.splitext(path)[1] else path + ".png"


def check_vocab_size(vocab_size: int, special_tokens: list[str], flag: str = "--vocab-size") -> None:
    """BPE starts from the 256 byte values plus the special tokens; a smaller vocabulary cannot exist."""
    minimum = 256 + len(set(special_tokens))
    if vocab_size < minimum:
        raise UserError(f"{flag} must be >= {minimum} (256 byte values + {len(set(special_tokens))} special "
                        f"token(s)), got {vocab_size}")


def load_tokenizer(tokenizer_dir: str, special_tokens: list[str]):
    """The tokenizer saved by `train-tokenizer` in `tokenizer_dir`; any damage to its files is one `UserError`
    naming the file (its parsers raise plain ValueError on content they cannot read)."""
    if os.path.isfile(tokenizer_dir):
        raise UserError(f"--tokenizer {tokenizer_dir} is a file; expected the folder holding vocab.json and "
                        "merges.txt")
    vocab_path, merges_path = (os.path.join(tokenizer_dir, name) for name in ("vocab.json", "merges.txt"))
    for path in (vocab_path, merges_path):
        if not os.path.isfile(path):
            raise UserError(f"{path} not found (run `cs336-basics train-tokenizer --out-dir {tokenizer_dir}`)")
    with reading(vocab_path):
        _check_vocab_shape(vocab_path)
    from cs336_basics.tokenizer import Tokenizer
    from cs336_basics.tokenizer.serialization import load_merges, load_vocab

    with reading(vocab_path):
        try:
            vocab = load_vocab(vocab_path)
        except ValueError as e:
            raise UserError(f"cannot read {vocab_path}: {e}") from e
    with reading(merges_path):
        try:
            merges = load_merges(merges_path)
        except ValueError as e:  # its line errors already name the file
            raise UserError(str(e) if merges_path in str(e) else f"cannot read {merges_path}: {e}") from e
    try:
        return Tokenizer(vocab, merges, special_tokens)
    except ValueError as e:
        raise UserError(f"tokenizer {tokenizer_dir} is inconsistent: {e}") from e


def _check_vocab_shape(path: str) -> None:
    """vocab.json must be {token string: non-negative id}; other JSON would fail deep inside the tokenizer."""
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    if not isinstance(entries, dict) or not entries:
        raise UserError(f"{path} is not a vocab.json: expected a non-empty object of token -> id")
    bad = next((k for k, v in entries.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
    if bad is not None:
        raise UserError(f"{path} is not a vocab.json: token {bad!r} has id {entries[bad]!r}, not an id >= 0")


def checkpoint_path(run_dir: str) -> str:
    """run_dir/checkpoint.pt, refused at once when missing or empty (before the seconds torch takes to load)."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint.pt in {run_dir} (--run-dir takes the --out-dir of a `cs336-basics train` run)")
    if os.path.getsize(path) == 0:
        raise UserError(f"cannot read checkpoint {path}: the file is empty")
    if not zipfile.is_zipfile(path):  # torch.save (as `train` calls it) always writes a zip archive
        raise UserError(f"cannot read checkpoint {path}: not a torch checkpoint (no zip archive)")
    return path


def load_trained_model(run_dir: str, device: str = "auto"):
    """The model saved by `train` in `run_dir` (config.json + checkpoint.pt), in eval mode. Configs saved
    before a model-family field existed load with that field's default (the model they were trained as)."""
    path = checkpoint_path(run_dir)
    from cs336_basics.checkpoint import load_checkpoint_state
    from cs336_basics.model import TransformerConfig, TransformerLM
    from cs336_basics.training.trainer import resolve_device

    state = load_checkpoint_state(path, map_location="cpu")
    extra = state.get("extra")
    model_config = extra.get("model_config") if isinstance(extra, dict) else None
    if not isinstance(model_config, dict):
        raise UserError(f"{path} does not record its model configuration (not written by `cs336-basics train`)")
    try:
        model = TransformerLM(TransformerConfig.from_dict(model_config))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as e:  # a config or weights that do not fit the model
        raise UserError(f"{path} does not hold a loadable model: {str(e).strip().splitlines()[0]}") from e
    return model.to(resolve_device(device)).eval()


def sample_text(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                seed: int, stop_token: str = DEFAULT_SPECIAL) -> list[str]:
    import torch

    from cs336_basics.decoding import generate

    stop_ids = tokenizer.encode(stop_token) if stop_token else []
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    outputs = generate(model, [tokenizer.encode(p) for p in prompts], max_new_tokens, temperature, top_p,
                       stop_token_id=stop_ids[0] if len(stop_ids) == 1 else None, generator=generator,
                       num_ids=max(tokenizer.vocab) + 1)
    return [tokenizer.decode(ids) for ids in outputs]
