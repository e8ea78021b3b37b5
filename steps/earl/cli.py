"""The ``earl`` command (``[project.scripts]``): tools for people using the pipeline's models.

    earl edit --model results/rl/<name>-<hash> --image in.png --instruction "..." --out edit.png

Each subcommand is a module of this package with ``main(argv, prog)``; a new one is one line in ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name: (module, one-line help)
    "edit": ("earl.edit", "edit an image with a trained model (an sft/rl artifact or a hub checkpoint)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: earl COMMAND [ARGS] (earl COMMAND --help for its arguments)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        sys.exit(f"earl: unknown command {argv[0]!r}\n{usage()}")
    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:], prog=f"earl {argv[0]}")


if __name__ == "__main__":
    main()
