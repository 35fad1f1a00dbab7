#!/usr/bin/env bash
# Installs the package as a user would, in fresh environments with none of this repository's settings:
# the wheel's own metadata must resolve next to the newest pipecat-ai, livekit-agents and torch (our
# [tool.uv] overrides do not travel with the wheel). Then, in the uv-installed environment, without moshi
# or silentcipher installed: make-tiny, a watermarked `say`, and an import of both integrations.
#
#   scripts/check_install.sh [WORKDIR]        (.ci/run runs it; about a minute with a warm uv cache)
#
# Prints each environment's key versions and its size on disk (the install-size figure in the README).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work"
rm -rf "$work/dist" "$work/pip-env" "$work/uv-env" "$work/tiny"
extras="pipecat,livekit,server"

uv build --quiet --wheel --out-dir "$work/dist"
wheel=$(ls "$work"/dist/misotts_agents-*.whl)
echo "built $(basename "$wheel")"
if unzip -p "$wheel" '*.dist-info/METADATA' | grep -iE '^Requires-Dist: (moshi|silentcipher)'; then
  echo "FAIL: the wheel's metadata names moshi or silentcipher" >&2
  exit 1
fi

# Outside the repository, so nothing of its pyproject.toml ([tool.uv]) applies.
cd "$work"

# 1. pip's resolver, as `pip install "misotts-agents[...]"` in a new virtual environment: a dry run with
#    no configuration files (this machine's extra indexes and caps are not a user's) and PyPI only.
python3 -m venv pip-env
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS="" pip-env/bin/python -m pip install --quiet --dry-run \
  --report pip-report.json "$wheel[$extras]"
python3 - pip-report.json <<'EOF'
import json, sys
versions = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.load(open(sys.argv[1]))["install"]}
print("pip resolves:", ", ".join(f"{n} {versions.get(n)}" for n in ("torch", "aiohttp", "pipecat-ai", "livekit-agents")))
EOF

# 2. uv, installing for real (`uv add` resolves the same metadata); --no-config: no uv.toml, no overrides.
uv venv --quiet --no-config -p 3.11 uv-env
uv pip install --quiet --no-config -p uv-env/bin/python "$wheel[$extras]"
py=uv-env/bin/python
"$py" - <<'EOF'
from importlib.metadata import version
from importlib.util import find_spec

def release(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version(name).split("+")[0].split(".")[:2])

for name, floor in (("torch", (2, 10)), ("aiohttp", (3, 14))):
    assert release(name) >= floor, f"{name} {version(name)} is older than {floor}"
for name in ("moshi", "silentcipher"):
    assert find_spec(name) is None, f"{name} is installed in the fresh environment"
print("uv installs:", ", ".join(f"{n} {version(n)}" for n in ("torch", "aiohttp", "pipecat-ai", "livekit-agents")))
EOF
echo "environment size: $(du -sm uv-env | cut -f1) MB"

# 3. The product in that environment: an offline tiny model (the tokenizer file taken from the dev
#    environment: nothing here reaches the Hub), a watermarked reply, both integrations importable; neither
#    original package imported along the way.
tokenizer=$("$repo/.venv/bin/python" -c 'from misotts_agents.testing.tiny import bundled_tokenizer; print(bundled_tokenizer())')
uv-env/bin/misotts-agents make-tiny tiny --tokenizer "$tokenizer"
uv-env/bin/misotts-agents say "Installed where agents are built." --model tiny --device cpu --seed 1 --max-ms 2000 --out say.wav
"$py" - <<'EOF'
import sys

import soundfile

import misotts_agents.livekit  # noqa: F401
import misotts_agents.pipecat  # noqa: F401
from misotts_agents.model.watermark import Watermarker

info = soundfile.info("say.wav")
assert info.samplerate == 24000 and info.frames > 0, info
Watermarker.load("tiny/silentcipher")
loaded = sorted(name for name in ("moshi", "silentcipher") if name in sys.modules)
assert not loaded, f"imported: {loaded}"
print(f"say.wav: {info.frames / info.samplerate:.2f} s at {info.samplerate} Hz; both integrations import")
EOF
echo "install check passed"
