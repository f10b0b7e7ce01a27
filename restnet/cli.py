"""`restnet`: a thin dispatcher. Each subcommand lives with its side and is imported lazily,
so `restnet --help` starts fast and no side imports another."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("restnet.demo", "main", "a simulated fleet adapting live on a private Mosquitto"),
    "catalog": ("restnet.stitch_cmd", "catalog_main", "build or show the catalog of hybrids"),
    "cka": ("restnet.stitch_cmd", "cka_main", "write a CKA heat map for two anchors"),
    "controller": ("fleet_controller.cli", "main", "run the fleet controller"),
    "policy": ("fleet_controller.cli", "policy_main", "check a fleet.yaml or write its schema"),
    "keys": ("fleet_controller.cli", "keys_main", "make, rotate or retire the signing keys"),
    "agent": ("device_agent.cli", "main", "run a device agent, or provision its cache"),
    "infer": ("device_agent.infer_client", "main",
              "classify images with the model a board's agent serves"),
    "simulate": ("simulators.cli", "main", "run a simulated fleet against a broker"),
    "broker": ("fleet_controller.cli", "broker_main",
               "write a Mosquitto config with per-device credentials and ACLs"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        lines = [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: restnet COMMAND [ARGS]  (restnet COMMAND --help for more)\n\ncommands:\n"
              + "\n".join(lines))
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    module, func, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), func)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
