"""Analysis artifacts of an experiment folder: expert_hist.png (+ the per-layer heatmap
when several layers were logged), stats.json and analysis_note.md, from moe_routes.jsonl.

    python -m experiments.report results/run [--layer N]
"""

import argparse
import json
from pathlib import Path

from analysis.logfile import read_log
from analysis.metrics import analysis_note
from analysis.plot import write_plots
from analysis.stats import report


def write_report(folder: Path, layer: int | None = None) -> list[Path]:
    log = read_log(folder / "moe_routes.jsonl")
    layers = log.meta["layers_logged"]
    layer = layers[0] if layer is None else layer
    written = write_plots(log, layer, folder / "expert_hist.png")
    written.append(folder / "stats.json")
    written[-1].write_text(json.dumps(report(log, layers, weighted=False), indent=1) + "\n")
    written.append(folder / "analysis_note.md")
    written[-1].write_text(analysis_note(log, layer) + "\n")
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layer", type=int)
    args = parser.parse_args(argv)
    for path in write_report(args.folder, args.layer):
        print(f"wrote {path}")
    print((args.folder / "analysis_note.md").read_text())


if __name__ == "__main__":
    main()
