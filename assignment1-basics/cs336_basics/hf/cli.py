"""`cs336-basics export-hf` and `cs336-basics import-hf` (registered by cs336_basics.cli via `add_commands`)."""

import argparse
import json
import os


def _existing_folder(path: str) -> str:
    if os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"no such folder: {path}")
    return path


def cmd_export_hf(args) -> dict:
    from cs336_basics.hf.interop import export_hf

    report = export_hf(args.run_dir, args.tokenizer, args.out, overwrite=args.overwrite, dtype=args.dtype)
    print(json.dumps(report))
    return report


def cmd_import_hf(args) -> dict:
    from cs336_basics.hf.interop import import_hf

    report = import_hf(args.hf_dir, args.out_dir, overwrite=args.overwrite)
    print(json.dumps(report))
    return report


def add_commands(subparsers) -> None:
    """Adds export-hf and import-hf to a `parser.add_subparsers()` object."""
    p = subparsers.add_parser("export-hf", help="write a trained run as a Hugging Face model folder "
                              "(Llama, Mistral or DeepseekV3; safetensors + fast tokenizer)")
    p.add_argument("--run-dir", required=True, type=_existing_folder, help="the --out-dir of a `train` run")
    p.add_argument("--tokenizer", required=True, type=_existing_folder, help="folder with vocab.json and merges.txt")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    p.set_defaults(func=cmd_export_hf)

    p = subparsers.add_parser("import-hf", help="turn a Hugging Face Llama/Mistral/DeepseekV3 folder into a run "
                              "folder (checkpoint.pt + tokenizer/) that `generate` can sample from")
    p.add_argument("--hf-dir", required=True, type=_existing_folder,
                   help="folder with config.json, safetensors weights and tokenizer.json")
    p.add_argument("--out-dir", required=True, help="the run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out-dir folder")
    p.set_defaults(func=cmd_import_hf)
