"""Commands around conversion (NVIDIA guide's toolbox): each module here defines
``register(sub)`` (adds its argparse sub-commands, each with ``set_defaults(tool=handler)``) and
handlers ``handler(args) -> int``. :func:`register` wires every module in :data:`MODULES` into the
main parser; the CLI calls ``args.tool(args)`` for them, inside its ConversionError handling."""
from __future__ import annotations

import argparse
import importlib

# module names under hfnemo.tools, each with register(sub)
MODULES: list[str] = ["inspect", "verify", "backup", "validate"]


def register(sub: "argparse._SubParsersAction") -> None:
    for name in MODULES:
        importlib.import_module(f"hfnemo.tools.{name}").register(sub)
