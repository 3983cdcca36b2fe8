"""Analysis artifacts of an experiment folder, from its moe_routes.jsonl: what
analysis.report writes (expert_hist.png and the other figures, stats.json,
analysis_note.md, report.md), into the same folder.

    python -m experiments.report results/run [--layer N]
"""

import argparse
import sys
from pathlib import Path

from analysis.logfile import check_output, read_log
from analysis.report import write_report as write_analysis
from analysis.tokens import decoder


def write_report(folder: Path, layer: int | None = None) -> list[Path]:
    log = read_log(folder / "moe_routes.jsonl")
    layer = log.meta["layers_logged"][0] if layer is None else layer
    decode = decoder(None, log.meta.get("model_id"))  # the model's own tokenizer, when it is here
    return list(write_analysis(log, folder, layer, decode=decode, path=folder / "moe_routes.jsonl").values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layer", type=int)
    args = parser.parse_args(argv)
    if not (args.folder / "moe_routes.jsonl").is_file():
        sys.exit(f"{args.folder}: no moe_routes.jsonl here; give the folder of an experiments.run")
    check_output(args.folder / "report.md")
    for path in write_report(args.folder, args.layer):
        print(f"wrote {path}")
    print((args.folder / "analysis_note.md").read_text())


if __name__ == "__main__":
    main()
