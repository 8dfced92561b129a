#!/bin/sh
# Makes the TLS test certificates of tests/data/tls (valid for 100 years): a CA, a server
# certificate for localhost/127.0.0.1/::1 and a client certificate it signed, another CA with a
# client certificate and a server certificate of its own (one the server must refuse, one it
# is renewed with), and the server's key encrypted.
# Test-only: the keys are public.
set -eu
out=${1:-tests/data/tls}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
days=36500
ca() {  # NAME SUBJECT
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tmp/$1.key" \
    -out "$out/$1.pem" -days $days -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}
leaf() {  # NAME CA SUBJECT SUBJECT-ALT-NAMES EXTENDED-KEY-USAGE
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$out/$1.key" \
    -out "$tmp/$1.csr" -subj "/CN=$3"
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$4" "$5" > "$tmp/$1.ext"
  openssl x509 -req -in "$tmp/$1.csr" -CA "$out/$2.pem" -CAkey "$tmp/$2.key" -CAcreateserial \
    -CAserial "$tmp/$2.srl" -out "$out/$1.pem" -days $days -extfile "$tmp/$1.ext"
}
ca ca "Pictor test CA"
ca other-ca "Another test CA"
leaf server ca localhost "DNS:localhost,IP:127.0.0.1,IP:::1" serverAuth
leaf client ca "Pictor test client" "DNS:pictor-client" clientAuth
leaf other-client other-ca "A stranger" "DNS:pictor-client" clientAuth
leaf other-server other-ca localhost "DNS:localhost,IP:127.0.0.1,IP:::1" serverAuth  # a renewed certificate
# The server's key encrypted (passphrase "x"): gRPC cannot read it, and the server must say so.
openssl pkey -in "$out/server.key" -out "$out/server-encrypted.key" -aes256 -passout pass:x
chmod 644 "$out"/*.key  # test keys, readable wherever the tests run
