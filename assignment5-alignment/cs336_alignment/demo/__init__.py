"""The demonstration that runs on one GPU in minutes: generated arithmetic word problems, a small cs336_basics
LM pretrained and SFT'd on them, then GRPO with the package's loop (see `pipeline.run_demo`)."""
