"""The GSM8K prompt slice: the first N test questions, as the experiment and the
benchmark use them."""

import json
from pathlib import Path

DATASET = ("openai/gsm8k", "main", "test")
SEPARATOR = "\n\n---\n\n"


def load_questions(n: int = 25, jsonl: Path | None = None) -> list[str]:
    """The first ``n`` questions of GSM8K's test split, from the hub or a local JSONL
    with the same records (``question``, ``answer``) in the same order."""
    if jsonl is not None:
        with open(jsonl) as f:
            records = [json.loads(line) for line in f if line.strip()]
        return [r["question"] for r in records[:n]]
    from datasets import load_dataset

    name, config, split = DATASET
    return list(load_dataset(name, config, split=split)["question"][:n])


def write_prompts(questions: list[str], path: Path) -> None:
    path.write_text(SEPARATOR.join(questions) + "\n")


def read_prompts(path: Path) -> list[str]:
    return [p.strip() for p in path.read_text().split(SEPARATOR) if p.strip()]


def chat_prompts(tokenizer, questions: list[str]) -> list[str]:
    """Each question as the single user turn of the model's chat template."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
