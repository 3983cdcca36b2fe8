"""Writes the prompt slice: the first N GSM8K test questions joined with '\\n\\n---\\n\\n'.

    python -m experiments.make_prompts [-o prompts.txt] [-n 25] [--from-jsonl FILE]

Without --from-jsonl the questions come from the hub (openai/gsm8k, main, test).
"""

import argparse
from pathlib import Path

from experiments.prompts import load_questions, write_prompts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("prompts.txt"))
    parser.add_argument("-n", type=int, default=25, help="number of questions (default 25)")
    parser.add_argument("--from-jsonl", type=Path, help="local JSONL with the same records, no hub access")
    args = parser.parse_args(argv)
    questions = load_questions(args.n, args.from_jsonl)
    write_prompts(questions, args.output)
    print(f"wrote {len(questions)} prompts to {args.output}")


if __name__ == "__main__":
    main()
