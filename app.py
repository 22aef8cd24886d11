#!/usr/bin/env python
"""T-Rex2-style visual-prompt labeling tool: the one entry point.

    python app.py [--images DIR] [--project FILE] [--host H] [--port P] [--weights PATH]
                                                                           labeling UI (default)
    python app.py label IMAGE_DIR --prompts PROMPTS.json --out OUT.json   batch labeling
    python app.py eval GT.json PRED.json [--exclude-exemplars PROMPTS.json]
    python app.py bench [...]                                              speed benchmark
    python app.py train [...]                                              retrain the model
    python app.py refine --labels L.json --images DIR --out W [--prompts P --check-share 0.2]
                                                                           fit + check a box refiner
"""
import sys

COMMANDS = {
    "label": ("app.batch", "Label a folder headless with a prompt file or class-embedding file."),
    "eval": ("app.evaluate", "Score a COCO prediction file against a COCO ground truth."),
    "bench": ("app.bench", "Print speed and memory figures beside the template-matching baseline."),
    "train": ("trex2.train", "Train the model (see README, 'Training')."),
    "refine": ("app.refiner_job", "Fit the box refiner to your labels and check it on labelled images kept out."),
    "ui": ("app.ui", "Start the labeling UI (the default)."),
}


def _usage() -> str:
    lines = [__doc__.strip(), "", "commands:"]
    lines += [f"  {name:<6} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines.append("\n'python app.py COMMAND --help' shows a command's options.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command = "ui"
    if argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    module_name = COMMANDS[command][0]
    module = __import__(module_name, fromlist=["main"])
    return int(module.main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
