#!/bin/sh
# Renders the configuration folder of one broker from the templates beside this script.
#
#   mosquitto/setup.sh local|cloud OUT_DIR
#
# Writes OUT_DIR/mosquitto.conf, OUT_DIR/acl and OUT_DIR/passwd (hashed with
# mosquitto_passwd), and creates the persistence folder. Passwords come from the
# environment (export them from .env); a missing one is an error, never an empty
# password. Run as root, it hands the files to the `mosquitto` user, which the broker
# drops to and which must be able to read them.
#
# Environment:
#   MQTT_LISTEN_PORT      listener port (default 1883)
#   MQTT_LISTEN_ADDRESS   address to bind (default: all interfaces)
#   MQTT_DATA_DIR         persistence folder (default OUT_DIR/data)
#   local broker only:
#     CLOUD_BRIDGE_HOST   cloud broker host for the bridge (default localhost)
#     CLOUD_BRIDGE_PORT   its port (default 1883)
#     BRIDGE_CLIENT_ID    the bridge's client id on the cloud broker, unique per edge site
#                         (default edge-bridge)
#   passwords, local:  TEMPERATURE_SENSOR_PASSWORD PRESSURE_SENSOR_PASSWORD
#                      DEVICE_STATUS_PASSWORD MQTT_SUBSCRIBER_PASSWORD BRIDGE_PASSWORD
#   passwords, cloud:  BRIDGE_PASSWORD MQTT_SUBSCRIBER_PASSWORD MONGO_PERSISTER_PASSWORD
set -eu

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "mosquitto/setup.sh: $*" >&2; exit 2; }

[ $# -eq 2 ] || die "usage: setup.sh local|cloud OUT_DIR"
broker=$1
out=$2
case $broker in
  local) users="temperature-sensor pressure-sensor device-status mqtt-subscriber" ;;
  cloud) users="bridge mqtt-subscriber mongo-persister" ;;
  *) die "unknown broker '$broker': expected local or cloud" ;;
esac
command -v mosquitto_passwd >/dev/null 2>&1 || die "mosquitto_passwd not found: install mosquitto"

# The variable that holds a user's password: temperature-sensor -> TEMPERATURE_SENSOR_PASSWORD.
password_of() {
  var=$(echo "$1" | tr 'a-z-' 'A-Z_')_PASSWORD
  eval "value=\${$var:-}"
  [ -n "$value" ] || die "$var is not set: set it in .env (see .env.example)"
  case $value in *"
"*) die "$var must be one line" ;; esac
  printf '%s' "$value"
}

# Escapes a value for the replacement side of a sed s||| command.
sed_escape() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
data=${MQTT_DATA_DIR:-$out/data}
mkdir -p "$data"

listener="listener ${MQTT_LISTEN_PORT:-1883}${MQTT_LISTEN_ADDRESS:+ $MQTT_LISTEN_ADDRESS}"
bridge_password=""
if [ "$broker" = local ]; then
  bridge_password=$(password_of bridge)
fi

old_umask=$(umask)
umask 077
sed -e "s|@LISTENER@|$(sed_escape "$listener")|" \
    -e "s|@CONF_DIR@|$(sed_escape "$out")|g" \
    -e "s|@DATA_DIR@|$(sed_escape "$data")|g" \
    -e "s|@CLOUD_ADDRESS@|$(sed_escape "${CLOUD_BRIDGE_HOST:-localhost}:${CLOUD_BRIDGE_PORT:-1883}")|g" \
    -e "s|@BRIDGE_CLIENT_ID@|$(sed_escape "${BRIDGE_CLIENT_ID:-edge-bridge}")|g" \
    -e "s|@BRIDGE_PASSWORD@|$(sed_escape "$bridge_password")|g" \
    "$here/$broker.conf.template" > "$out/mosquitto.conf"
cp "$here/$broker.acl" "$out/acl"

# Plain user:password lines, hashed in place (no password ever on a command line).
: > "$out/passwd"
for user in $users; do
  printf '%s:%s\n' "$user" "$(password_of "$user")" >> "$out/passwd"
done
mosquitto_passwd -U "$out/passwd"
umask "$old_umask"

# Mosquitto started as root drops to the `mosquitto` user: hand it the files, and check
# that it can reach them (a parent folder such as /root, mode 0700, would stop it).
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
  chown -R mosquitto: "$out" "$data"
  if ! su -s /bin/sh mosquitto -c "test -r '$out/passwd' && test -r '$out/acl' && test -w '$data'" 2>/dev/null; then
    die "the mosquitto user cannot read $out or write $data: every parent folder needs o+x (chmod o+x DIR), or choose an OUT_DIR it can reach"
  fi
fi
echo "mosquitto/setup.sh: $broker broker configured in $out ($listener)" >&2
