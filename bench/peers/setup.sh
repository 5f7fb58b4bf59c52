#!/usr/bin/env bash
# A peer framework's own environment for the benchmarks, e.g. TRL:
#   bash bench/peers/setup.sh trl-1.16 "trl==1.16.0"   →  .venv-peers/trl-1.16/bin/python
# The peer venv sees prefloop's .venv (torch, transformers, datasets — one copy, the same
# versions for both sides of a benchmark) through a .pth file, and installs only what the peer
# adds on top (trl, accelerate). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1 spec=$2
main=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
venv=.venv-peers/$name
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$main" > "$site/zz_prefloop_venv.pth"
"$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('${spec%%==*}') == '${spec##*==}' else 1)" 2>/dev/null \
  || "$venv/bin/python" -m pip install -q --disable-pip-version-check "$spec"
echo "$venv/bin/python"
