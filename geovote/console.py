"""The `geovote` command: one name for the README's jobs, each the same main(argv) as its module.

    geovote build [...]      = python -m embed.build        (index a dataset or a folder of photos)
    geovote locate IMG [...] = python -m retrieve.query     (where was this photo taken)
    geovote serve [...]      = python -m retrieve.serve     (the web page and HTTP API)
    geovote bench [...]      = python -m benchmark.run      (every method on test, OSV-5M's metrics)
    geovote publish [...]    = python -m retrieve.publish   (share an engine on the hub)
    geovote tune / train / score / sample / download: retrieve.tune, finetune.train, benchmark.score,
                               geovote.sample, geovote.download
The modules are named, not imported, here: they are loaded only when their subcommand runs (a query
does not load the trainer), and no library imports a command (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "build": ("embed.build", "index a dataset or a folder of photos (embeddings, index, tuning)"),
    "locate": ("retrieve.query", "where was this photo taken (--together: several photos of one place)"),
    "serve": ("retrieve.serve", "the web page and HTTP API"),
    "bench": ("benchmark.run", "every method on test, with OSV-5M's metrics"),
    "publish": ("retrieve.publish", "write an engine's shareable folder, upload it to the hub"),
    "tune": ("retrieve.tune", "choose the voting settings and fit the calibration"),
    "train": ("finetune.train", "fine-tune the image tower for geolocation"),
    "score": ("benchmark.score", "score a predictions file with OSV-5M's metrics"),
    "sample": ("geovote.sample", "generate the bundled sample"),
    "download": ("geovote.download", "download OSV-5M from the hub"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: geovote COMMAND [ARGS...]   (geovote COMMAND --help for its own options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {what}  (python -m {module})"
              for name, (module, what) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"geovote: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest)


def run() -> None:
    """The console script's entry point ([project.scripts] in pyproject.toml)."""
    from geovote.cli import exit_now

    try:
        code = main()
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    exit_now(code)


if __name__ == "__main__":
    run()
