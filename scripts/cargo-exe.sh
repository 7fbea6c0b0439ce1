#!/usr/bin/env bash
# Builds with `cargo ARGS... --no-run --message-format=json` and prints the
# path of the executable whose target is named NAME.
# usage: scripts/cargo-exe.sh NAME cargo-subcommand [args...]
set -euo pipefail
name="$1"; shift
cargo "$@" --no-run --message-format=json | python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name:
        print(m["executable"])' "$name"
