"""Adapters on a whole model: wrap the linear layers whose names match, train only the adapters, merge them,
switch them off, save and load them alone (safetensors + a JSON config)."""

import contextlib
import fnmatch
import os
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from cs336_alignment.peft.config import CONFIG_NAME, DEFAULT_TARGETS, WEIGHTS_NAME, LoRAConfig
from cs336_alignment.peft.layer import LINEAR_TYPES, LoRALinear, QLoRALinear
from cs336_alignment.peft.nf4 import check_quantizable
from cs336_basics.cli_support import UserError

ADAPTER_KEYS = ("lora_A", "lora_B")


def matches(name: str, pattern: str) -> bool:
    """Does module `name` (dotted, as in `named_modules()`) match `pattern`?

    - `re:<regex>`: the regular expression must match the whole dotted name (`re:.*layers\\.[01]\\..*proj`);
    - a pattern with a dot: shell-style wildcards (`fnmatch`, case-sensitive) over the whole dotted name or
      a dotted suffix of it (`layers.0.attn.*` matches `model.layers.0.attn.q_proj`);
    - a pattern without a dot: wildcards over the module's own name, the part after the last dot
      (`q_proj`, `*_proj`, `w[13]`), like peft's `target_modules` list.
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if "." in pattern:
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))
    return fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)


def linear_layers(model: nn.Module) -> list[str]:
    """Names of the plain linear layers (torch or cs336_basics) that LoRA can wrap."""
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    return [name for name, m in model.named_modules()
            if isinstance(m, LINEAR_TYPES) and name.rsplit(".", 1)[0] not in wrapped]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wraps every linear layer matched by `config.targets` in a `LoRALinear` (`QLoRALinear` with
    `config.qlora`), freezes every other parameter, records the wrapped names in `config.wrapped` and returns
    them. Nothing is changed when a pattern matches nothing or a 4-bit weight shape is impossible (one-line
    `UserError`s naming the flag, the pattern, the layer)."""
    config.validate()
    candidates = linear_layers(model)
    chosen = [name for name in candidates if any(matches(name, p) for p in config.targets)]
    unused = [p for p in config.targets if not any(matches(name, p) for name in candidates)]
    # Every pattern the user names must find a layer; the default list spans two model families, so there
    # only the list as a whole must.
    if not chosen or (unused and tuple(config.targets) != DEFAULT_TARGETS):
        examples = ", ".join(candidates[:4]) + (" ..." if len(candidates) > 4 else "")
        what = list(config.targets) if not chosen else unused
        raise UserError(f"--lora-targets {what} match no linear layer of the model (its linear layers: "
                        f"{examples or 'none'})")
    if config.qlora:
        for name in chosen:
            try:
                check_quantizable(tuple(model.get_submodule(name).weight.shape), config.block_size, name=name)
            except UserError as e:
                raise UserError(f"--qlora: {e}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        base = model.get_submodule(name)
        if config.qlora:
            layer = QLoRALinear(base, config.rank, config.alpha, config.dropout, config.block_size,
                                config.scale_block_size, name=name)
        else:
            layer = LoRALinear(base, config.rank, config.alpha, config.dropout)
        _set_module(model, name, layer)
    config.wrapped = tuple(chosen)
    return chosen


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


def mark_only_lora_trainable(model: nn.Module, also: Sequence[nn.Module] = ()) -> None:
    """requires_grad on the adapters (and on the modules in `also`, e.g. a value head) and nowhere else."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ADAPTER_KEYS)
    for module in also:
        for p in module.parameters():
            p.requires_grad_(True)


def merge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model without its adapters for the duration (a reference policy without a second copy)."""
    layers = [layer for _, layer in lora_layers(model)]
    states = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, states, strict=True):
            layer.disabled = state


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replaces every `LoRALinear` by its base layer (merged first when `merge`), leaving a plain model."""
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        _set_module(model, name, layer.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, keyed by their names in the model."""
    return {name: p.detach() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ADAPTER_KEYS}


def save_adapters(model: nn.Module, directory: str | os.PathLike, config: LoRAConfig) -> str:
    """`adapter_model.safetensors` (the A and B matrices, a few MB) and `adapter_config.json` into `directory`."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    if not state:
        raise UserError("the model has no LoRA adapters to save")
    for layer_name, layer in lora_layers(model):
        if layer.merged:
            raise UserError(f"{layer_name} is merged; unmerge before saving the adapters")
    tmp = os.path.join(directory, WEIGHTS_NAME + ".tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
    config.save(directory)
    return directory


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> LoRAConfig:
    """Loads adapters saved by `save_adapters`, wrapping the model first when it has none yet (the same layers
    as recorded in the config); every saved tensor must find its place and every adapter must be covered."""
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"{os.path.join(directory, name)} does not exist")
    config = LoRAConfig.load(directory)
    if not has_lora(model):
        if config.wrapped:
            config.targets = tuple(f"re:{re.escape(name)}" for name in config.wrapped)
        inject_lora(model, config)
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    params = dict(model.named_parameters())
    expected = set(lora_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise UserError(f"{directory}: adapters do not fit this model (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        for key, value in state.items():
            if params[key].shape != value.shape:
                raise UserError(f"{directory}: {key} has shape {tuple(value.shape)}, the model's is "
                                f"{tuple(params[key].shape)}")
            params[key].copy_(value)
    return config
