#!/usr/bin/env bash
# Builds with `cargo ARGS... --message-format=json` (with --no-run for
# `test`) and prints the path of the executable whose target is named NAME.
# usage: scripts/cargo-exe.sh NAME cargo-subcommand [args...]
set -euo pipefail
name="$1"; shift
no_run=()
[ "$1" = test ] && no_run=(--no-run)
cargo "$@" "${no_run[@]}" --message-format=json | python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name:
        print(m["executable"])' "$name"
