#!/bin/sh
# Generates a development CA and the cloud broker's TLS certificate, once.
#
#   mosquitto/certs.sh CERTS_DIR [NAME ...]
#
# NAMEs are the host names and IP addresses the edge bridge reaches the cloud broker by
# (default: mosquitto-cloud localhost 127.0.0.1); the certificate names them all, and
# the bridge verifies it against the CA. Existing files are kept: to use real
# certificates, put ca.crt, server.crt and server.key in CERTS_DIR instead.
#
# The CA's private key signs nothing after this: it is kept apart, in CA_KEY_DIR
# (default: CERTS_DIR-ca-private, beside it), never in the folder the brokers read.
# With CA_PUBLIC_DIR set, a copy of ca.crt goes there too (every run, so real
# certificates put in CERTS_DIR reach it): the folder for the services that only verify
# the cloud broker (the edge site's), which must not hold its private key.
set -eu
die() { echo "mosquitto/certs.sh: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: certs.sh CERTS_DIR [NAME ...]"
dir=$1
shift
[ $# -gt 0 ] || set -- mosquitto-cloud localhost 127.0.0.1

ca_dir=${CA_KEY_DIR:-${dir%/}-ca-private}
mkdir -p "$dir" "$ca_dir"
chmod 700 "$ca_dir"
# Copies ca.crt to CA_PUBLIC_DIR, when set; the script's last step.
publish_ca() {
  [ -n "${CA_PUBLIC_DIR:-}" ] || return 0
  mkdir -p "$CA_PUBLIC_DIR"
  cp "$dir/ca.crt" "$CA_PUBLIC_DIR/ca.crt.new"
  chmod 644 "$CA_PUBLIC_DIR/ca.crt.new"
  mv "$CA_PUBLIC_DIR/ca.crt.new" "$CA_PUBLIC_DIR/ca.crt"
}
san=""
for name in "$@"; do
  case $name in
    *[!0-9.]*) entry="DNS:$name" ;;
    *) entry="IP:$name" ;;
  esac
  san="${san:+$san,}$entry"
done

# The server's key and certificate for the NAMEs, signed by the CA in $ca_dir. For
# client authentication too: a NATS node presents it to the others on their routes.
issue_server() {
  old_umask=$(umask)
  umask 077
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$1" \
    -keyout "$dir/server.key.new" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$ca_dir/ca.key" -CAcreateserial \
    -days 825 -extfile "$dir/server.ext" -out "$dir/server.crt.new" 2>/dev/null
  rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
  umask "$old_umask"
  chmod 644 "$dir/server.crt.new"
  mv "$dir/server.key.new" "$dir/server.key"
  mv "$dir/server.crt.new" "$dir/server.crt"
}

if [ -f "$dir/ca.crt" ] && [ -f "$dir/server.crt" ] && [ -f "$dir/server.key" ]; then
  # One this script made before it added client authentication (its CA key is here):
  # made again from the same CA, so that whoever trusts the CA still does.
  if [ -f "$ca_dir/ca.key" ] && command -v openssl >/dev/null 2>&1 &&
    openssl x509 -in "$dir/server.crt" -noout -text 2>/dev/null | grep -q "TLS Web Server Authentication" &&
    ! openssl x509 -in "$dir/server.crt" -noout -text 2>/dev/null | grep -q "TLS Web Client Authentication"; then
    issue_server "$@"
    echo "mosquitto/certs.sh: server certificate for $* made again for client authentication too (NATS routes), from the same CA, in $dir" >&2
  fi
  publish_ca
  exit 0
fi
command -v openssl >/dev/null 2>&1 || die "openssl not found: install it (apt-get install openssl)"

old_umask=$(umask)
umask 077
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=IoT pipeline development CA" \
  -keyout "$ca_dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
umask "$old_umask"
chmod 644 "$dir/ca.crt"
issue_server "$@"
echo "mosquitto/certs.sh: development certificates for $* in $dir" >&2
publish_ca
