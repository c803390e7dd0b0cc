"""Drafts made for a base model: `easyspec distill` trains one, `easyspec acceptance` measures it.

data.py (the base's own text, corpus windows, batches), generate.py (batched
generation with its own KV cache), shape.py (draft shape and its start from
the base's layers), forward.py (the exact and layer-parallel training forwards,
the losses), train.py (loop, budget, checkpoints), export.py (HF folder),
run.py (one run end to end), evaluate.py (acceptance on one device), cli.py
(both commands). The prompt sets live in prompts/ (scripts/distill-prompts.py
writes them); their paths are here so that the CLI parser needs no torch.
"""

from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
HELD_OUT_PROMPTS = PROMPT_DIR / "heldout.jsonl"  # for measuring acceptance, never for training
TRAIN_CHAT_PROMPTS = PROMPT_DIR / "train-chat.jsonl"
TRAIN_CODE_PROMPTS = PROMPT_DIR / "train-code.jsonl"
