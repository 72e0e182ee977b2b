#!/usr/bin/env bash
# Fetch timm's own tests/test_models.py from the source distribution of the installed timm version
# (from the package registry, as pip installs timm) into tests_timm/, where conftest.py registers the
# lcnn_* models before it collects. The file is not kept in this repository: it is always the one of
# the timm that is installed. Written under a temporary name and renamed; nothing else is touched.
set -euo pipefail
cd "$(dirname "$0")"
version=$(python3 -c "import timm; print(timm.__version__)")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: --no-build-isolation \
  "timm==$version" -d "$tmp" 2>/dev/null || python3 -m pip download -q --disable-pip-version-check --no-deps \
  --no-binary :all: "timm==$version" -d "$tmp"
tar -xzf "$tmp/timm-$version.tar.gz" -C "$tmp" "timm-$version/tests/test_models.py"
cp "$tmp/timm-$version/tests/test_models.py" .test_models.py.part
mv .test_models.py.part test_models.py
echo "tests_timm/test_models.py: timm $version's, from its source distribution"
