#!/bin/sh
# Renders the configuration folder of one broker from the templates beside this script.
#
#   mosquitto/setup.sh local|cloud OUT_DIR
#
# Writes OUT_DIR/mosquitto.conf, OUT_DIR/acl and OUT_DIR/passwd (hashed with
# mosquitto_passwd; the services' accounts from .env, then the devices' accounts kept by
# mosquitto/device.sh), and creates the persistence folder. The cloud broker gets a TLS
# listener for the bridge; its certificates are made by mosquitto/certs.sh when the
# certificates folder has none. Passwords come from the environment (export them from
# .env); a missing one is an error, never an empty password, and the example's
# change-me-... passwords are refused (exit 2, naming the variable) unless
# MQTT_LISTEN_ADDRESS is a loopback address. Run as root, it hands the files to the
# `mosquitto` user, which the broker drops to and which must be able to read them.
#
# Environment:
#   MQTT_LISTEN_PORT      listener port (default 1883)
#   MQTT_LISTEN_ADDRESS   address to bind (default: all interfaces)
#   MQTT_DATA_DIR         persistence folder (default OUT_DIR/data)
#   MQTT_CERTS_DIR        TLS certificates, shared by both brokers (default OUT_DIR/../certs):
#                         ca.crt for both, server.crt and server.key for the cloud broker
#   cloud broker only:
#     MQTT_TLS_PORT       the TLS listener's port (default 8883), on MQTT_LISTEN_ADDRESS
#     CLOUD_TLS_NAMES     names in a generated certificate (default: mosquitto-cloud
#                         localhost 127.0.0.1); the bridge must use one of them
#   local broker only:
#     EDGE_FORWARDER      what carries the edge's messages to the cloud: relay (default:
#                         edge-relay with its on-disk log, logging in as `edge-relay`) or
#                         bridge (Mosquitto's bridge, local-bridge.conf.template)
#     EDGE_QUEUE_BYTES    relay only: bytes the broker may queue per client beyond
#                         what is in flight (default 1073741824, 1 GiB)
#     CLOUD_BRIDGE_HOST   bridge only: cloud broker host (default localhost)
#     CLOUD_BRIDGE_PORT   bridge only: its TLS port (default 8883)
#     BRIDGE_CLIENT_ID    bridge only: its client id on the cloud broker, unique per edge
#                         site (default edge-bridge)
#   passwords, local:  TEMPERATURE_SENSOR_PASSWORD PRESSURE_SENSOR_PASSWORD
#                      DEVICE_STATUS_PASSWORD MQTT_SUBSCRIBER_PASSWORD, and
#                      EDGE_RELAY_PASSWORD (relay) or BRIDGE_PASSWORD (bridge)
#   passwords, cloud:  BRIDGE_PASSWORD MQTT_SUBSCRIBER_PASSWORD MONGO_PERSISTER_PASSWORD
#                      EDGE_RELAY_PASSWORD (optional: without it there are no edge-relay
#                      users) DASHBOARD_PASSWORD (optional: without it no dashboard user)
#                      EDGE_SITES (optional): edge sites with accounts of their own,
#                      "SITE:PASSWORD SITE:PASSWORD ...": users edge-relay-SITE and
#                      edge-relay-SITE-replay with the rights of edge-relay, for the relay
#                      started with --site SITE (CLOUD_USERNAME=edge-relay-SITE)
set -eu
# No pathname expansion: word lists such as EDGE_SITES carry passwords, which may hold
# '*' or '?'.
set -f

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "mosquitto/setup.sh: $*" >&2; exit 2; }

[ $# -eq 2 ] || die "usage: setup.sh local|cloud OUT_DIR"
broker=$1
out=$2
forwarder=${EDGE_FORWARDER:-relay}
case $forwarder in
  relay|bridge) ;;
  *) die "EDGE_FORWARDER is '$forwarder': expected relay or bridge" ;;
esac
case $broker in
  local) users="temperature-sensor pressure-sensor device-status mqtt-subscriber"
         if [ "$forwarder" = relay ]; then users="$users edge-relay"; fi ;;
  cloud) users="bridge bridge-replay mqtt-subscriber mongo-persister"
         # The edge relays' two accounts (forwarding, and requests in), and the Node-RED
         # dashboard's user, only when their passwords are set: a .env from before they
         # existed keeps working.
         [ -z "${EDGE_RELAY_PASSWORD:-}" ] || users="$users edge-relay edge-relay-replay"
         [ -z "${DASHBOARD_PASSWORD:-}" ] || users="$users dashboard" ;;
  *) die "unknown broker '$broker': expected local or cloud" ;;
esac
command -v mosquitto_passwd >/dev/null 2>&1 || die "mosquitto_passwd not found: install mosquitto"

# The sites of EDGE_SITES (cloud broker only), checked whole before anything is
# written; their passwords are looked up again by site_password.
sites=""
if [ "$broker" = cloud ]; then
  entry=0
  for pair in ${EDGE_SITES:-}; do
    entry=$((entry + 1))
    site=${pair%%:*}
    # Without its ':', an entry may be a password: never print it.
    [ "$site" != "$pair" ] || die "EDGE_SITES: entry $entry has no ':': expected SITE:PASSWORD entries, separated by blanks"
    [ -n "${pair#*:}" ] || die "EDGE_SITES: site '$site' has no password: expected SITE:PASSWORD"
    case $site in
      ""|[!A-Za-z0-9]*|*[!A-Za-z0-9_-]*|replay|*-replay) bad=true ;;
      *) bad=false ;;
    esac
    if $bad || [ "${#site}" -gt 48 ]; then
      die "EDGE_SITES: site '$site': letters, digits, '_' and '-', starting with a letter or digit, at most 48, not ending in -replay"
    fi
    case " $sites " in *" $site "*) die "EDGE_SITES: site '$site' is listed twice" ;; esac
    sites="$sites $site"
    users="$users edge-relay-$site edge-relay-$site-replay"
  done
fi
# Sets $value to the password EDGE_SITES gives site $1.
site_password() {
  for pair in ${EDGE_SITES:-}; do
    [ "${pair%%:*}" = "$1" ] && { value=${pair#*:}; return 0; }
  done
  die "EDGE_SITES has no password for site $1"
}

# Sets $value to a user's password, from its variable (temperature-sensor ->
# TEMPERATURE_SENSOR_PASSWORD); exits naming the variable when it is missing or unusable.
# Called directly, never in $(...), so that its exit ends the script.
password_of() {
  # The bridge's two connections (mosquitto/local-bridge.conf.template) share one
  # password, and so do each relay's.
  case $1 in *-replay) set -- "${1%-replay}" ;; esac
  case $1 in edge-relay-*) site=${1#edge-relay-} ;; *) site="-" ;; esac
  case " $sites " in
    *" $site "*)
      var="EDGE_SITES (site $site)"
      site_password "$site" ;;
    *)
      var=$(echo "$1" | tr 'a-z-' 'A-Z_')_PASSWORD
      eval "value=\${$var:-}"
      [ -n "$value" ] || die "$var is not set: set it in .env (see .env.example)" ;;
  esac
  case $value in *"
"*) die "$var must be one line" ;; esac
  # The example's passwords are published: never on a broker others can reach.
  case $value in
    change-me*) $loopback || die "$var is the published example password ($value), and the broker listens on ${MQTT_LISTEN_ADDRESS:-every interface}: make a .env with new secrets (scripts/new-env), or listen on loopback only (MQTT_LISTEN_ADDRESS=127.0.0.1)" ;;
  esac
  # mosquitto_passwd -U splits each line at the first ':' and trims blanks around the
  # password, so such a password would be stored changed and every login would fail.
  case $value in
    *:*) die "$var contains ':', which Mosquitto's password file cannot hold: choose another password" ;;
    [[:space:]]*|*[[:space:]]) die "$var starts or ends with a blank, which Mosquitto's password file drops: choose another password" ;;
  esac
}

# Whether every listener is bound to loopback, where only this machine reaches it.
case ${MQTT_LISTEN_ADDRESS:-} in
  127.*|localhost|::1) loopback=true ;;
  *) loopback=false ;;
esac

# Escapes a value for the replacement side of a sed s||| command.
sed_escape() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }

# Every password is checked before anything is written (folders, certificates, files),
# so a refused one changes nothing and leaves no plain-text file behind.
for user in $users; do password_of "$user"; done
if [ "$broker" = local ] && [ "$forwarder" = bridge ]; then password_of bridge; fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
data=${MQTT_DATA_DIR:-$out/data}
mkdir -p "$data"

listener="listener ${MQTT_LISTEN_PORT:-1883}${MQTT_LISTEN_ADDRESS:+ $MQTT_LISTEN_ADDRESS}"
tls_listener="listener ${MQTT_TLS_PORT:-8883}${MQTT_LISTEN_ADDRESS:+ $MQTT_LISTEN_ADDRESS}"
certs=${MQTT_CERTS_DIR:-$out/../certs}
bridge_password=""
if [ "$broker" = local ]; then
  if [ "$forwarder" = bridge ]; then
    password_of bridge
    bridge_password=$value
    [ -f "$certs/ca.crt" ] || die "no $certs/ca.crt: set up the cloud broker first (it makes the certificates) or put the cloud's CA there"
  fi
else
  # shellcheck disable=SC2086 # the names are words on purpose
  sh "$here/certs.sh" "$certs" ${CLOUD_TLS_NAMES:-}
fi
if [ -d "$certs" ]; then certs=$(cd "$certs" && pwd); fi

# What the edge broker holds for a client in memory (local.conf.template): bounded for
# edge-relay, whose disk is the store; unbounded for the bridge, whose queue is. In
# flight: above what the relay holds before it stops reading (64 MiB for its disk and
# 64 MiB waiting, and a message). Queued: EDGE_QUEUE_BYTES, default 1 GiB (as much
# again as the relay's default disk budget, for a relay down or a budget full of the
# services' messages).
if [ "$forwarder" = relay ]; then
  max_inflight_bytes=167772160 max_queued_bytes=${EDGE_QUEUE_BYTES:-1073741824}
  case $max_queued_bytes in
    ""|*[!0-9]*) die "EDGE_QUEUE_BYTES is '$max_queued_bytes': expected a number of bytes, such as 1073741824" ;;
  esac
else
  max_inflight_bytes=0 max_queued_bytes=0
fi

old_umask=$(umask)
umask 077
sed -e "s|@LISTENER@|$(sed_escape "$listener")|" \
    -e "s|@MAX_QUEUED_BYTES@|$max_queued_bytes|g" \
    -e "s|@MAX_INFLIGHT_BYTES@|$max_inflight_bytes|g" \
    -e "s|@TLS_LISTENER@|$(sed_escape "$tls_listener")|" \
    -e "s|@CERTS_DIR@|$(sed_escape "$certs")|g" \
    -e "s|@CONF_DIR@|$(sed_escape "$out")|g" \
    -e "s|@DATA_DIR@|$(sed_escape "$data")|g" \
    -e "s|@CLOUD_ADDRESS@|$(sed_escape "${CLOUD_BRIDGE_HOST:-localhost}:${CLOUD_BRIDGE_PORT:-8883}")|g" \
    -e "s|@BRIDGE_CLIENT_ID@|$(sed_escape "${BRIDGE_CLIENT_ID:-edge-bridge}")|g" \
    -e "s|@BRIDGE_PASSWORD@|$(sed_escape "$bridge_password")|g" \
    "$here/$broker.conf.template" > "$out/mosquitto.conf"
if [ "$broker" = local ] && [ "$forwarder" = bridge ]; then
  sed -e "s|@CERTS_DIR@|$(sed_escape "$certs")|g" \
      -e "s|@CLOUD_ADDRESS@|$(sed_escape "${CLOUD_BRIDGE_HOST:-localhost}:${CLOUD_BRIDGE_PORT:-8883}")|g" \
      -e "s|@BRIDGE_CLIENT_ID@|$(sed_escape "${BRIDGE_CLIENT_ID:-edge-bridge}")|g" \
      -e "s|@BRIDGE_PASSWORD@|$(sed_escape "$bridge_password")|g" \
      "$here/local-bridge.conf.template" >> "$out/mosquitto.conf"
fi
cp "$here/$broker.acl" "$out/acl.services"
# Each site of EDGE_SITES: the edge-relay accounts' two blocks of cloud.acl, renamed.
for site in $sites; do
  printf '\n# Site %s (EDGE_SITES), with the rights of edge-relay.\n' "$site" >> "$out/acl.services"
  sed -n '/^user edge-relay$/,/^$/p; /^user edge-relay-replay$/,/^$/p' "$here/cloud.acl" |
    sed -e "s/^user edge-relay\(-replay\)\{0,1\}$/user edge-relay-$site\1/" >> "$out/acl.services"
done

# Plain user:password lines, hashed in place (no password ever on a command line).
: > "$out/passwd.services"
for user in $users; do
  password_of "$user"
  printf '%s:%s\n' "$user" "$value" >> "$out/passwd.services"
done
mosquitto_passwd -U "$out/passwd.services"
umask "$old_umask"
# The broker's passwd and acl: the services' accounts, then the devices' that
# mosquitto/device.sh keeps in the persistence folder (scripts/add-device).
sh "$here/device.sh" render "$out"

# Mosquitto started as root drops to the `mosquitto` user: hand it the files, and check
# that it can reach them (a parent folder such as /root, mode 0700, would stop it).
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
  chown -R mosquitto:mosquitto "$out" "$data"
  [ "$broker" = local ] || chown mosquitto:mosquitto "$certs/server.key"
  ca_check=true
  if [ "$broker" = cloud ] || [ "$forwarder" = bridge ]; then ca_check="test -r '$certs/ca.crt'"; fi
  if ! su -s /bin/sh mosquitto -c "test -r '$out/passwd' && test -r '$out/acl' && test -w '$data' && $ca_check" 2>/dev/null; then
    die "the mosquitto user cannot read $out or write $data: every parent folder needs o+x (chmod o+x DIR), or choose an OUT_DIR it can reach"
  fi
fi
if [ "$broker" = cloud ]; then
  echo "mosquitto/setup.sh: cloud broker configured in $out ($listener; TLS $tls_listener)" >&2
elif [ "$forwarder" = bridge ]; then
  echo "mosquitto/setup.sh: local broker configured in $out ($listener; bridge to ${CLOUD_BRIDGE_HOST:-localhost}:${CLOUD_BRIDGE_PORT:-8883} over TLS)" >&2
else
  echo "mosquitto/setup.sh: local broker configured in $out ($listener; edge-relay forwards to the cloud, as user edge-relay)" >&2
fi
