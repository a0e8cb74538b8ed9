#!/usr/bin/env bash
# Make one authentication key pair per SuperNode (ECDSA P-384, OpenSSH format).
#
#   deploy/make-node-keys.sh OUT_DIR NAME [NAME ...]
#
# Writes into OUT_DIR (created with mode 700), for each NAME:
#   NAME        the private key: copy it to that device only
#               (flower-supernode --auth-supernode-private-key NAME)
#   NAME.pub    the public key: register it at the SuperLink
#               (flwr supernode register NAME.pub <connection>)
# A SuperLink started with --enable-supernode-auth accepts only registered keys.
# Existing keys are never overwritten.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 OUT_DIR NAME [NAME ...]   (e.g. device-0 device-1)" >&2
    exit 2
fi
out=$1
shift
mkdir -p "$out"
chmod 700 "$out"

for name in "$@"; do
    if [[ ! $name =~ ^[A-Za-z0-9._-]+$ ]]; then
        echo "bad key name '$name': use letters, digits, '.', '_' and '-'" >&2
        exit 2
    fi
    if [[ -e "$out/$name" ]]; then
        echo "$out/$name exists; refusing to overwrite it" >&2
        exit 1
    fi
    # -N "": no passphrase (flower-supernode cannot ask for one); -C: a label in the .pub.
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$out/$name"
    echo "$out/$name (private) and $out/$name.pub (public)"
done
