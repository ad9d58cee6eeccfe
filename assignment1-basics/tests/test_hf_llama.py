"""Hugging Face interop, dense family: parity with LlamaForCausalLM (MHA, GQA, MQA) in logits and every
parameter gradient, the export -> transformers -> import round trip, the fast tokenizer, refusals, the CLI."""

import argparse
import json
import os

import pytest
import torch

from cs336_basics.checkpoint import save_checkpoint
from cs336_basics.cli_support import UserError
from cs336_basics.hf import architecture_for, export_hf, from_hf, import_hf
from cs336_basics.hf.cli import add_commands
from cs336_basics.hf.parity import compare, randomize_
from cs336_basics.model import TransformerConfig, TransformerLM
from cs336_basics.tokenizer import Tokenizer, load_merges, load_vocab, save_tokenizer, train_bpe

transformers = pytest.importorskip("transformers")

# fp32, seq 24, logits of magnitude ~5: measured max |Δlogit| ~1e-6 and max relative Δgrad ~1e-6.
LOGIT_TOL, GRAD_TOL = 1e-4, 1e-4
EOS = "<|endoftext|>"
VOCAB = 300
TRAIN_TEXT = ("Once upon a time, a little dog named Max ran to the park. He saw a café, a naïve bird and 3 cats!\n"
              "They played   all day.\t\tThe end. <|endoftext|> Lily liked blue balloons; she said: \"¡Olé!\" 😀 "
              "and smiled.\n\n") * 30
HELD_OUT = ("Max met Lily at the café <|endoftext|> 😀😀 ¿Qué?  \t\n\n  two  spaces, ünïcödé, 12345 "
            "and a never-seen word: zyxwvut.")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    (folder / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    vocab, merges = train_bpe(folder / "train.txt", VOCAB, [EOS])
    save_tokenizer(vocab, merges, folder / "bpe")
    return folder / "bpe"


def tiny(**fields) -> TransformerConfig:
    base = dict(vocab_size=VOCAB, context_length=32, d_model=48, num_layers=2, num_heads=6, d_ff=80,
                rope_theta=500.0, rmsnorm_eps=1e-6)
    return TransformerConfig(**(base | fields))


def seeded_model(config: TransformerConfig, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(config)
    randomize_(model, torch.Generator().manual_seed(seed + 1))
    return model


def load_hf(folder, attn: str = "eager"):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                              attn_implementation=attn)
    assert model.config._attn_implementation == attn
    return model


def batch(seed: int = 0, length: int = 24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, length), generator=g), torch.randint(0, VOCAB, (2, length), generator=g)


@pytest.mark.parametrize("kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_llama_parity_logits_and_gradients(tmp_path, tokenizer_dir, kv_heads):
    config = tiny(num_kv_heads=kv_heads)
    ours = seeded_model(config)
    export_hf((ours, config), tokenizer_dir, tmp_path / "hf")
    hf_model = load_hf(tmp_path / "hf")
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert hf_model.config.num_key_value_heads == config.kv_heads
    ids, targets = batch()
    result = compare(ours, hf_model, ids, targets)
    assert result.holds(LOGIT_TOL, GRAD_TOL), result

    # The same check fails once a single weight differs (here one entry of a key projection).
    with torch.no_grad():
        ours.layers[1].attn.k_proj.weight[3, 5] += 0.5
    broken = compare(ours, hf_model, ids, targets)
    assert not broken.holds(LOGIT_TOL, GRAD_TOL), broken


def test_from_hf_reads_a_model_transformers_wrote(tmp_path):
    """A Llama made and saved by transformers itself (GQA, its own init, tied embeddings) imports with equal
    logits: the import path is checked independently of our exporter."""
    hf_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=32,
                                         rope_theta=300.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for layer in hf_model.model.layers:
            layer.input_layernorm.weight.normal_(1.0, 0.1)
    hf_model.save_pretrained(tmp_path / "native")
    ours, config = from_hf(tmp_path / "native")
    assert (config.num_kv_heads, config.rope_theta, config.rmsnorm_eps) == (2, 300.0, 1e-5)
    ids, targets = batch()
    # Logits only: the tied embedding's gradient is the sum of our two untied ones.
    assert compare(ours, hf_model, ids, targets).max_logit_diff <= LOGIT_TOL


def test_rope_permutation_is_needed(tmp_path, tokenizer_dir):
    """Without the interleaved -> rotate-half row reorder the parity breaks: the permutation is not a no-op."""
    from cs336_basics.hf import weights

    config = tiny(num_kv_heads=2)
    ours = seeded_model(config)
    original = weights.halves_order
    try:
        weights.halves_order = lambda d_head: torch.arange(d_head)
        export_hf((ours, config), tokenizer_dir, tmp_path / "hf")
    finally:
        weights.halves_order = original
    ids, targets = batch()
    assert not compare(ours, load_hf(tmp_path / "hf"), ids, targets).holds(LOGIT_TOL, GRAD_TOL)


def save_run(run_dir, model: TransformerLM) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    save_checkpoint(model, optimizer, 7, run_dir / "checkpoint.pt", extra={"model_config": model.config.to_dict()})


def test_round_trip_through_transformers(tmp_path, tokenizer_dir):
    """Saved run -> export_hf -> AutoModelForCausalLM/AutoTokenizer on held-out text -> from_hf / import_hf."""
    config = tiny(num_kv_heads=3)
    ours = seeded_model(config, seed=3).eval()
    save_run(tmp_path / "run", ours)
    summary = export_hf(tmp_path / "run", tokenizer_dir, tmp_path / "hf")
    assert summary["architecture"] == "llama"
    files = sorted(os.listdir(tmp_path / "hf"))
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["attention_bias"] is False
    assert saved["rms_norm_eps"] == 1e-6 and saved["rope_theta"] == 500.0 and saved["max_position_embeddings"] == 32

    ours_tok = Tokenizer.from_files(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt", [EOS])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = ours_tok.encode(HELD_OUT)
    assert hf_tok(HELD_OUT)["input_ids"] == ids
    assert hf_tok.eos_token == EOS and hf_tok.eos_token_id == ours_tok.encode(EOS)[0] == summary["eos_token_id"]
    assert hf_tok.decode(ids) == HELD_OUT == ours_tok.decode(ids)

    hf_model = load_hf(tmp_path / "hf", attn="sdpa")
    ids = torch.tensor([ids[:32]])
    with torch.no_grad():
        assert (ours(ids) - hf_model(ids).logits).abs().max() <= LOGIT_TOL

    back, back_config = from_hf(tmp_path / "hf")
    assert back_config == config
    expected = ours.state_dict()
    assert back.state_dict().keys() == expected.keys()
    assert all(torch.equal(back.state_dict()[k], expected[k]) for k in expected)

    report = import_hf(tmp_path / "hf", tmp_path / "imported")
    from cs336_basics.cli import load_trained_model

    loaded = load_trained_model(str(tmp_path / "imported"), device="cpu")
    assert all(torch.equal(loaded.state_dict()[k], expected[k]) for k in expected)
    tok_dir = tmp_path / "imported" / "tokenizer"
    assert report["tokenizer_dir"] == str(tok_dir)
    assert load_vocab(tok_dir / "vocab.json") == load_vocab(tokenizer_dir / "vocab.json")
    assert load_merges(tok_dir / "merges.txt") == load_merges(tokenizer_dir / "merges.txt")


@pytest.mark.parametrize(("fields", "reason"), [
    ({"position": "alibi"}, "position='alibi'"),
    ({"position": "none"}, "position='none'"),
    ({"norm": "post"}, "norm='post'"),
    ({"norm": "none"}, "norm='none'"),
    ({"ffn": "silu"}, "ffn='silu'"),
    ({"attention": "linear", "position": "none"}, "attention='linear'"),
    ({"ffn": "moe", "moe_d_ff": 16}, "needs attention='mla'"),
])
def test_variants_without_an_hf_architecture_are_refused(fields, reason):
    with pytest.raises(UserError, match="cannot export to Hugging Face") as error:
        architecture_for(tiny(**fields))
    assert reason in str(error.value) and "\n" not in str(error.value)


def test_export_refuses_before_writing(tmp_path, tokenizer_dir):
    config = tiny(position="alibi")
    with pytest.raises(UserError, match="position='alibi'"):
        export_hf((TransformerLM(config), config), tokenizer_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_import_refuses_foreign_architectures(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2'"):
        from_hf(tmp_path / "gpt2")


def run_cli(argv: list[str]):
    parser = argparse.ArgumentParser(prog="cs336-basics")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_export_and_import(tmp_path, tokenizer_dir, capsys, monkeypatch):
    config = tiny()
    save_run(tmp_path / "run", seeded_model(config))
    out = tmp_path / "hf"
    report = run_cli(["export-hf", "--run-dir", str(tmp_path / "run"), "--tokenizer", str(tokenizer_dir),
                      "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == report and report["architecture"] == "llama"
    before = (out / "model.safetensors").read_bytes()

    # An existing output is refused without --overwrite; a failed overwrite leaves it as it was.
    with pytest.raises(UserError, match="--overwrite"):
        run_cli(["export-hf", "--run-dir", str(tmp_path / "run"), "--tokenizer", str(tokenizer_dir),
                 "--out", str(out)])
    from cs336_basics.hf import interop

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(interop, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        run_cli(["export-hf", "--run-dir", str(tmp_path / "run"), "--tokenizer", str(tokenizer_dir),
                 "--out", str(out), "--overwrite"])
    monkeypatch.undo()
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no staging folder left behind

    run_cli(["import-hf", "--hf-dir", str(out), "--out-dir", str(tmp_path / "back")])
    assert sorted(os.listdir(tmp_path / "back")) == ["checkpoint.pt", "tokenizer"]
    with pytest.raises(UserError, match="would replace the input"):
        run_cli(["import-hf", "--hf-dir", str(out), "--out-dir", str(out), "--overwrite"])
    with pytest.raises(SystemExit):
        run_cli(["export-hf", "--run-dir", str(tmp_path / "missing"), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "x")])
