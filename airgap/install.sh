#!/usr/bin/env bash
# Install the appliance on an air-gapped head node from a signed offline wheel bundle.
#
#   install.sh --key RELEASE.pub.pem [--python python3.11] BUNDLE VENV
#
# Needs only bash, openssl, and a Python with its standard library (pip comes from the bundle).
# Nothing is installed unless, first: the manifest's signature verifies with the release key
# you give (obtained separately, never from the bundle), every wheel and file matches its
# signed sha256, and the bundle holds nothing the manifest does not list. pip then installs
# with no index at all, every wheel pinned to its hash. The environment gets a record of the
# wheels' sha256 (VENV/appliance-bundle.json), which every run's signed attestation carries.
set -euo pipefail

die() {
  printf 'install.sh: error: %s\n' "$1" >&2
  if [ -n "${2:-}" ]; then printf '  fix: %s\n' "$2" >&2; fi
  exit 2
}
usage="usage: install.sh --key RELEASE.pub.pem [--python PYTHON] BUNDLE VENV"

KEY=""
PY="python3"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --key) KEY="${2:-}"; shift 2 || die "$usage" ;;
    --python) PY="${2:-}"; shift 2 || die "$usage" ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) die "unknown option $1" "$usage" ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[ ${#ARGS[@]} -eq 2 ] || die "give the bundle folder and the environment to install into" "$usage"
BUNDLE="${ARGS[0]}"
VENV="${ARGS[1]}"
[ -n "$KEY" ] || die "no release key given" "pass --key with the release public key (PEM) of the site that built the bundle, obtained separately from the bundle"
[ -f "$KEY" ] || die "the release key $KEY does not exist" "give the path of the release public key (PEM)"
command -v openssl >/dev/null 2>&1 || die "openssl is not installed" "install openssl from the head node's OS media"
command -v "$PY" >/dev/null 2>&1 || die "no Python interpreter '$PY'" "pass --python with the path of the Python the bundle was built for"
[ -d "$BUNDLE" ] || die "$BUNDLE is not a folder" "give the bundle's folder (from \`appliance airgap bundle --out\`)"
[ -f "$BUNDLE/manifest.json" ] || die "$BUNDLE holds no manifest.json" "give the bundle's folder (from \`appliance airgap bundle --out\`)"
[ -f "$BUNDLE/manifest.json.sig" ] || die "$BUNDLE holds no manifest.json.sig: the bundle is unsigned" "get the signed bundle from the build machine"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# 1. The signature, with openssl alone: nothing from the bundle runs before this passes.
if ! openssl dgst -sha256 -verify "$KEY" -signature "$BUNDLE/manifest.json.sig" "$BUNDLE/manifest.json" >"$TMP/openssl.out" 2>&1; then
  die "the manifest's signature does not verify with $KEY ($(tr '\n' ' ' <"$TMP/openssl.out" | cut -c1-120))" \
    "the bundle was changed after it was signed, or signed by another key: check that $KEY is the release key of the site that built it; never install a bundle that fails this"
fi
echo "signature OK: $BUNDLE/manifest.json, signed by $KEY"

# 2. check.py is the one file of the bundle that runs; its hash must be the signed one first.
want="$("$PY" -c 'import json, sys; m = json.load(open(sys.argv[1])); print(next(f["sha256"] for f in m["files"] if f["path"] == "check.py"))' "$BUNDLE/manifest.json")" \
  || die "the signed manifest lists no check.py" "rebuild the bundle with \`appliance airgap bundle\`"
have="$(openssl dgst -sha256 -r "$BUNDLE/check.py" 2>/dev/null | cut -d' ' -f1)" || true
[ "$want" = "$have" ] || die "$BUNDLE/check.py does not match its signed sha256" "the bundle was changed after it was signed: get it again from the build machine"

# 3. Every wheel and file against the manifest; nothing extra. Writes pip's hash-pinned requirements.
"$PY" "$BUNDLE/check.py" verify "$BUNDLE" "$TMP/requirements.txt" || exit 2

# 4. Install: no index, no configuration or PIP_* variables of this host, every wheel hash-pinned;
#    reinstalled even where the same version is there, so what runs is the bundle's (and an
#    install killed half-way is made whole by running this again).
fresh=0
if [ ! -e "$VENV" ]; then
  "$PY" -m venv --without-pip "$VENV" || die "could not make the environment $VENV" "check that $PY has its venv module and that the folder's parent is writable"
  fresh=1
elif [ ! -x "$VENV/bin/python" ]; then
  die "$VENV exists and is not a Python environment" "name a new folder, or an environment made by a previous install"
fi
pipwheel="$(find "$BUNDLE/wheels" -maxdepth 1 -name 'pip-*.whl' | head -n 1)"
if [ -n "$pipwheel" ]; then
  PIP=("$VENV/bin/python" "$pipwheel/pip")   # the bundle's own pip, run from its verified wheel
else
  PIP=("$VENV/bin/python" -m pip)            # an update bundle without pip: the environment's
fi
while read -r name; do unset "$name"; done < <(compgen -e | grep '^PIP_' || true)
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "${PIP[@]}" install --no-index --find-links "$BUNDLE/wheels" --require-hashes --no-deps --force-reinstall -r "$TMP/requirements.txt" >"$TMP/pip.out" 2>&1; then
  tail -n 5 "$TMP/pip.out" >&2
  if [ "$fresh" = 1 ]; then rm -rf "$VENV"; fi
  die "pip could not install the bundle into $VENV (its last lines are above)" "a wheel for another platform or Python says so above: build the bundle for this head node's target"
fi

# 5. The record the attestation reads, then a first check that the appliance starts.
"$VENV/bin/python" "$BUNDLE/check.py" record "$BUNDLE" "$VENV"
if ! "$VENV/bin/python" -m pip check >"$TMP/check.out" 2>&1; then
  echo "note: \`pip check\` reports unmet requirements (expected for a partial bundle, which updates an existing install):" >&2
  head -n 5 "$TMP/check.out" >&2
fi
if [ -x "$VENV/bin/appliance" ]; then
  "$VENV/bin/appliance" --version
  echo "installed into $VENV; next: $VENV/bin/appliance airgap check"
fi
