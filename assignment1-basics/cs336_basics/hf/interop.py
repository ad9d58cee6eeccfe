"""Export a cs336 model to a Hugging Face folder and load one back.

    export_hf(run_dir, tokenizer_dir, out_dir)        -> config.json, model.safetensors, tokenizer files
    from_hf(hf_dir)                                   -> (TransformerLM, TransformerConfig)
    import_hf(hf_dir, out_dir)                        -> out_dir/checkpoint.pt + out_dir/tokenizer/

The exported folder loads offline with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.
from_pretrained`; the imported run works with `cs336-basics generate --run-dir R --tokenizer R/tokenizer`.
Outputs are staged in a hidden sibling folder and renamed into place only when complete.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cs336_basics.cli_support import UserError, check_output, reading
from cs336_basics.hf.architectures import DEEPSEEK_V3, architecture_for, config_from_hf, hf_config
from cs336_basics.hf.tokenizer_files import EOS, read_tokenizer_json, write_tokenizer_files
from cs336_basics.hf.weights import from_hf_state_dict, to_hf_state_dict
from cs336_basics.model import ConfigError, TransformerConfig, TransformerLM
from cs336_basics.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------- output folders
def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@contextmanager
def staged_folder(out_dir: str | os.PathLike, overwrite: bool, inputs: tuple[str, ...] = (),
                  flag: str = "--out") -> Iterator[str]:
    """A fresh hidden folder beside `out_dir` that replaces it (whole) only when the block succeeds.

    A non-empty `out_dir` is refused unless `overwrite`; so is an `out_dir` that is, or holds, an input.
    """
    out_dir = os.fspath(out_dir)
    check_output(out_dir, flag, folder=True)
    for source in inputs:
        if _inside(source, out_dir):
            raise UserError(f"{flag} {out_dir} would replace the input {source}; choose another folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"{flag} {out_dir} already exists and is not empty; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out_dir))}.")
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; the output gets what mkdir would give it
        if os.path.exists(out_dir):
            old = staging + ".old"
            os.rename(out_dir, old)
            os.rename(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------- export
def load_run(run_dir: str | os.PathLike) -> tuple[TransformerLM, TransformerConfig]:
    """The model of a `cs336-basics train` run folder (checkpoint.pt with extra["model_config"]), on the CPU."""
    from cs336_basics.checkpoint import load_checkpoint_state

    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint.pt in {run_dir} (--run-dir takes the --out-dir of a `cs336-basics train` run)")
    state = load_checkpoint_state(path, map_location="cpu")
    saved = (state.get("extra") or {}).get("model_config")
    if not isinstance(saved, dict):
        raise UserError(f"{path} does not record its model configuration (not written by `cs336-basics train`)")
    try:
        config = TransformerConfig.from_dict(saved)
        model = TransformerLM(config)
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not hold a loadable model: {str(e).strip().splitlines()[0]}") from e
    return model.eval(), config


def _read_tokenizer(tokenizer_dir: str | os.PathLike):
    from cs336_basics.tokenizer import load_merges, load_vocab

    paths = [os.path.join(tokenizer_dir, name) for name in ("vocab.json", "merges.txt")]
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{path} not found (--tokenizer takes the --out-dir of `cs336-basics train-tokenizer`)")
    try:
        with reading(paths[0]):
            vocab = load_vocab(paths[0])
        with reading(paths[1]):
            merges = load_merges(paths[1])
    except ValueError as e:
        raise UserError(f"cannot read the tokenizer in {tokenizer_dir}: {e}") from e
    return vocab, merges


def export_hf(source: str | os.PathLike | tuple[TransformerLM, TransformerConfig], tokenizer_dir: str | os.PathLike,
              out_dir: str | os.PathLike, *, overwrite: bool = False, dtype: str = "float32",
              special_tokens: tuple[str, ...] = (EOS,)) -> dict[str, Any]:
    """Writes a Hugging Face folder for a run folder (or a model and its config) and our tokenizer folder.

    Returns a summary (architecture, parameter count, eos id, out_dir). Refuses variants with no HF
    architecture (`architecture_for`) before touching `out_dir`.
    """
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    inputs = (os.fspath(tokenizer_dir),)
    if isinstance(source, tuple):
        model, config = source
    else:
        inputs += (os.fspath(source),)
        model, config = load_run(source)
    model_type = architecture_for(config)
    vocab, merges = _read_tokenizer(tokenizer_dir)
    special = list(dict.fromkeys(special_tokens))
    try:  # our Tokenizer checks the files agree and gives missing special tokens their ids
        largest = max(Tokenizer(vocab, merges, special).vocab)
    except ValueError as e:
        raise UserError(f"tokenizer {tokenizer_dir} is inconsistent: {e}") from e
    if largest >= config.vocab_size:
        raise UserError(f"the tokenizer has ids up to {largest} but the model's vocabulary has {config.vocab_size}: "
                        "use the tokenizer the run was trained with")
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes every key
    state = {name: tensor.detach().to("cpu", DTYPES[dtype]) for name, tensor in model.state_dict().items()}
    if model_type == DEEPSEEK_V3:  # transformers keeps the routing bias in float32 whatever the dtype
        state = {n: t.float() if n.endswith("expert_bias") else t for n, t in state.items()}
    tensors = to_hf_state_dict(state, config)
    with staged_folder(out_dir, overwrite, inputs) as staging:
        write_tokenizer_files(vocab, merges, special, config.context_length, staging)
        from tokenizers import Tokenizer as HFTokenizer

        eos_id = HFTokenizer.from_file(os.path.join(staging, "tokenizer.json")).token_to_id(EOS)
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config(config, dtype, eos_id), f, indent=2)
        with open(os.path.join(staging, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": eos_id, "eos_token_id": eos_id}, f, indent=2)
        save_file(tensors, os.path.join(staging, WEIGHTS), metadata={"format": "pt"})
    return {"architecture": model_type, "parameters": sum(t.numel() for t in tensors.values()),
            "eos_token_id": eos_id, "dtype": dtype, "out_dir": os.fspath(out_dir)}


# ------------------------------------------------------------------------------------------------- import
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found (not a Hugging Face model folder)")
    with reading(path):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / WEIGHTS_INDEX).is_file():
        files = [folder / name for name in sorted(set(_read_json(folder / WEIGHTS_INDEX)["weight_map"].values()))]
    else:
        raise UserError(f"{folder} has no {WEIGHTS} (or sharded index); only safetensors weights are read")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors |= load_file(path)
        except Exception as e:  # a truncated or foreign file: safetensors raises its own error types
            raise UserError(f"cannot read {path}: {str(e).strip().splitlines()[0]}") from e
    return tensors


def from_hf(hf_dir: str | os.PathLike) -> tuple[TransformerLM, TransformerConfig]:
    """Our float32 model for a Llama / Mistral / DeepseekV3 folder (config.json + safetensors)."""
    folder = Path(hf_dir)
    config = config_from_hf(_read_json(folder / "config.json"))
    architecture_for(config)  # the reverse mapping exists for exactly these configs
    state = from_hf_state_dict(_read_weights(folder), config)
    model = TransformerLM(config)
    try:
        model.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    except RuntimeError as e:  # shapes that contradict config.json
        raise UserError(f"{folder}: weights do not fit its config.json: {str(e).strip().splitlines()[-1]}") from e
    return model.eval(), config


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Any]:
    """A cs336 run folder from a Hugging Face folder: out_dir/checkpoint.pt (what `generate` loads) and
    out_dir/tokenizer/{vocab.json, merges.txt} from its byte-level BPE tokenizer.json."""
    from cs336_basics.tokenizer import save_tokenizer

    model, config = from_hf(hf_dir)
    tokenizer_json = Path(hf_dir) / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise UserError(f"{tokenizer_json} not found: only fast (tokenizer.json) byte-level BPE tokenizers are read")
    vocab, merges, special = read_tokenizer_json(tokenizer_json)
    try:  # what `generate` will build from the files we write: every byte, every merge's parts and result
        Tokenizer(vocab, merges, special)
    except ValueError as e:
        raise UserError(f"{tokenizer_json} is not a tokenizer cs336 can use: {e}") from e
    if max(vocab) >= config.vocab_size:
        raise UserError(f"{tokenizer_json} has ids up to {max(vocab)} but the model's vocabulary has "
                        f"{config.vocab_size}")
    state = {"model": model.state_dict(), "optimizer": {}, "iteration": 0,
             "extra": {"model_config": config.to_dict(), "imported_from": os.path.abspath(hf_dir)}}
    with staged_folder(out_dir, overwrite, (os.fspath(hf_dir),), flag="--out-dir") as staging:
        torch.save(state, os.path.join(staging, "checkpoint.pt"))
        try:
            save_tokenizer(vocab, merges, os.path.join(staging, "tokenizer"))
        except ValueError as e:
            raise UserError(f"{tokenizer_json}: {e}") from e
    return {"architecture": architecture_for(config), "parameters": model.num_parameters(),
            "special_tokens": special, "run_dir": os.fspath(out_dir),
            "tokenizer_dir": os.path.join(os.fspath(out_dir), "tokenizer")}


__all__ = ["ConfigError", "export_hf", "from_hf", "import_hf", "load_run", "staged_folder"]
