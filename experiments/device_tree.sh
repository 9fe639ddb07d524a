#!/usr/bin/env bash
# Keep the bundled reference models (packages/jquant-models/jquant_models/jq-*, ~206 MB) out of what the device
# tool sends (tracked + untracked-not-ignored files, 64 MiB at most): the rest of the tree is ~16 MB.
#
#   experiments/device_tree.sh slim      # before device `run` calls: the model folders leave the index (the files
#                                        # stay on disk) and .git/info/exclude ignores them
#   experiments/device_tree.sh restore   # right after: the index entries come back from HEAD, the exclude line goes
#   experiments/device_tree.sh status    # which state the checkout is in
#
# While slim, a local pre-commit hook refuses every commit (a commit then would delete the models from the repo).
# A device command that needs a model carries it: `carry: ["packages/jquant-models/jquant_models/jq-llama-tiny"]`.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
models=packages/jquant-models/jquant_models
pattern="/$models/jq-*/"
marker=.git/jquant-device-slim
hook=.git/hooks/pre-commit
case "${1:-status}" in
slim)
    if [ -e "$marker" ]; then echo "already slim"; exit 0; fi
    if ! git diff --quiet -- "$models" || ! git diff --cached --quiet -- "$models"; then
        echo "refused: $models has uncommitted changes; commit them first" >&2; exit 1
    fi
    mkdir -p .git/hooks
    if [ -e "$hook" ] && ! grep -q jquant-device-slim "$hook"; then
        echo "refused: $hook exists and is not this script's; remove or merge it first" >&2; exit 1
    fi
    printf '#!/bin/sh\nif [ -e .git/jquant-device-slim ]; then\n  echo "commit refused: the bundled models are out of the index (experiments/device_tree.sh restore first)" >&2\n  exit 1\nfi\n' > "$hook"
    chmod +x "$hook"
    git ls-files -- "$models/jq-*" > "$marker"
    grep -qxF "$pattern" .git/info/exclude 2>/dev/null || echo "$pattern" >> .git/info/exclude
    git rm -r -q --cached -- "$models"/jq-*
    echo "slim: $(wc -l < "$marker") model files out of the index; run 'experiments/device_tree.sh restore' after the device calls"
    ;;
restore)
    if [ ! -e "$marker" ]; then echo "not slim"; exit 0; fi
    git reset -q HEAD -- "$models"
    grep -vxF "$pattern" .git/info/exclude > .git/info/exclude.new || true
    mv .git/info/exclude.new .git/info/exclude
    missing=$(git ls-files --deleted -- "$models" | wc -l)
    rm "$marker"
    echo "restored: the model files are tracked again ($missing missing from disk)"
    ;;
status)
    if [ -e "$marker" ]; then echo "slim (restore before committing)"; else echo "normal"; fi
    ;;
*)
    echo "usage: $0 slim|restore|status" >&2; exit 2
    ;;
esac
