#!/usr/bin/env bash
# Make a private CA and a TLS certificate for the SuperLink, signed by that CA.
#
#   deploy/make-certs.sh OUT_DIR HOST [HOST ...]
#
# HOST: every DNS name or IP address that SuperNodes and the `flwr` CLI use to reach the
# SuperLink (e.g. superlink.example.org 192.168.1.20). localhost, 127.0.0.1 and ::1 are
# always added: the SuperLink's own SuperExec connects back over loopback with TLS, even
# when the SuperLink listens on 0.0.0.0.
#
# Writes into OUT_DIR (created with mode 700):
#   ca.crt      the CA certificate: copy it to every SuperNode and every `flwr` user
#   ca.key      the CA's private key: keep it offline, never copy it to a device
#   server.pem  the SuperLink's certificate  (--ssl-certfile)
#   server.key  the SuperLink's private key  (--ssl-keyfile), stays on the server
# Existing files are never overwritten: use a new OUT_DIR to start over.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 OUT_DIR HOST [HOST ...]   (DNS names / IPs of the SuperLink)" >&2
    exit 2
fi
out=$1
shift
days=${CERT_DAYS:-825}  # validity of the server certificate; the CA gets 10 years

if [[ -e "$out/ca.key" || -e "$out/server.key" ]]; then
    echo "$out already holds keys; refusing to overwrite them" >&2
    exit 1
fi
mkdir -p "$out"
chmod 700 "$out"
umask 077  # private keys readable by their owner only

# subjectAltName: the hosts given plus loopback, without duplicates.
sans=()
for host in "$@" localhost 127.0.0.1 ::1; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then
        entry="IP:$host"
    else
        entry="DNS:$host"
    fi
    [[ " ${sans[*]-} " == *" $entry "* ]] || sans+=("$entry")
done
san=$(IFS=,; echo "${sans[*]}")

# 1. The CA: a self-signed certificate that may sign others.
openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days 3650 \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=fedlpt federation CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# 2. The SuperLink's key and signing request, with the hosts as SANs.
openssl req -newkey rsa:4096 -sha256 -nodes \
    -keyout "$out/server.key" -out "$out/server.csr" -subj "/CN=$1" 2>/dev/null

# 3. The CA signs it as a TLS server certificate.
cat >"$out/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
openssl x509 -req -sha256 -days "$days" -in "$out/server.csr" \
    -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"

openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "CA and SuperLink certificate in $out (SANs: $san)"
