#!/bin/sh
# Device accounts on the edge broker, added and removed while it runs.
#
#   mosquitto/device.sh add NAME PRESET CONF_DIR   makes the account with DEVICE_PASSWORD, prints it
#   mosquitto/device.sh remove NAME CONF_DIR
#   mosquitto/device.sh list CONF_DIR
#   mosquitto/device.sh render CONF_DIR            (mosquitto/setup.sh runs it)
#
# CONF_DIR is a broker's folder made by mosquitto/setup.sh. An account is two files in
# the broker's persistence folder, devices/NAME.passwd (hashed) and devices/NAME.acl, so
# it outlives a new setup.sh run and a recreated container. The broker's passwd and acl
# are the services' (passwd.services, acl.services) followed by the devices'. After a
# change, the broker started with CONF_DIR/mosquitto.conf gets SIGHUP and reads them
# again: no restart, no connection dropped.
#
# PRESET says what the device may do (docs/real-devices.md); PRESET:PARAMETER=VALUE
# follows the layout its owner set (the same string as mongo-persister --ingest takes):
#   default        this project's reading form: /sensor/NAME/<measurement>, /device/NAME/status
#   tasmota        tele/NAME/#, stat/NAME/#; reads cmnd/NAME/# and the group cmnd/tasmotas/#
#   zigbee2mqtt    a Zigbee2MQTT bridge: zigbee2mqtt/# (its devices' states and commands)
#   esphome        a node whose topic_prefix is NAME: NAME/#; its Home Assistant discovery
#   shelly         Gen1 shellies/NAME/# (and shellies/command), Gen2+ topic prefix NAME/#
#   homeassistant  Home Assistant's statestream: homeassistant/#
#   sparkplug      a Sparkplug B edge node NAME: spBv1.0/<group>/N*/NAME, D*/NAME/<device>;
#                  reads its NCMD and DCMD and the host's STATE
# Layouts: tasmota:fulltopic=F (F as Tasmota shows it, %prefix% and %topic% in it),
# zigbee2mqtt:base_topic=B, homeassistant:base_topic=B, esphome:topic_prefix=P and
# shelly:topic_prefix=P (Gen2+; {device} in P where NAME goes, or P ending in NAME).
# A new account's topics may not reach another's: add refuses (exit 2, no file changed)
# one whose topic filters match a services' topic where the payload names the device,
# another preset's or the pipeline's space, or another device account's topics.
# Each account's largest message (DEVICE_MAX_MESSAGE, from add-device --max-message:
# bytes, or with K or M; at most 2M, the broker's max_packet_size) is written in its ACL
# block as '# max-message BYTES': Mosquitto 2.0 has only one global limit, so edge-relay
# reads it there (--accounts) and refuses larger messages of the account. Default 256K,
# 1M for sparkplug (a birth of 10 000 metrics).
# Environment: BROKER_ADDRESS (host:port, for the hint printed by add).
set -eu

die() { echo "mosquitto/device.sh: $*" >&2; exit 2; }
# Service accounts of mosquitto/setup.sh: never a device's name.
services="temperature-sensor pressure-sensor device-status mqtt-subscriber bridge bridge-replay edge-relay edge-relay-replay mongo-persister dashboard"
# The last levels of the services' own topics (/sensor/temperature, /device/status):
# never a device's name. A device named so would cover that topic, where the payload's
# device is believed (/sensor/temperature/# matches /sensor/temperature itself).
seed_levels="temperature pressure status"
# Topic roots of the presets and of the project: a device named like one would be given
# that whole root (esphome's NAME/#, shelly's NAME/#), other devices' topics included.
reserved="cmnd tele stat tasmotas zigbee2mqtt shellies homeassistant sensor device replay spBv1.0"
# The topic spaces of the presets and of the project, PRESET:FILTER: an account's
# topics may reach into its own preset's spaces only ("-": no device's). Where a
# payload's device is believed (the seed topics of acl.services), no device at all.
spaces="default:/sensor/# default:/device/# default:/replay/# tasmota:cmnd/# tasmota:tele/# tasmota:stat/# zigbee2mqtt:zigbee2mqtt/# shelly:shellies/# homeassistant:homeassistant/# sparkplug:spBv1.0/# -:\$SYS/# -:\$share/#"

conf_dir() {
  [ -f "$1/mosquitto.conf" ] || die "$1 is not a broker folder made by mosquitto/setup.sh (no mosquitto.conf)"
  (cd "$1" && pwd)
}

# The devices' folder: devices/ in the broker's persistence folder.
devices_dir() {
  data=$(sed -n 's/^persistence_location //p' "$1/mosquitto.conf")
  [ -n "$data" ] || die "$1/mosquitto.conf has no persistence_location"
  echo "${data%/}/devices"
}

# The whole name, not line by line: a newline would otherwise pass and break the
# broker's files.
check_name() {
  case $1 in
    ""|[!A-Za-z0-9]*|*[!A-Za-z0-9_.-]*) bad=true ;;
    *) bad=false ;;
  esac
  if $bad || [ "${#1}" -gt 64 ]; then
    die "device name $(printf '%s' "$1" | od -An -c | tr -s ' ' | head -c 80): letters, digits, '_', '.' and '-', starting with a letter or digit, at most 64"
  fi
}

# PRESET[:PARAMETER=VALUE] of $1: sets preset, and value (empty: the firmware's
# default layout), once the parameter is the preset's and the value one it can use.
parse_preset() {
  preset=${1%%:*} value=""
  [ "$preset" = "$1" ] && return 0
  setting=${1#*:}
  parameter=${setting%%=*} value=${setting#*=}
  [ "$parameter" != "$setting" ] || die "preset '$1': expected PRESET:PARAMETER=VALUE"
  case $preset in
    tasmota) expected=fulltopic ;;
    zigbee2mqtt|homeassistant) expected=base_topic ;;
    esphome|shelly) expected=topic_prefix ;;
    *) die "preset '$preset' takes no layout parameter" ;;
  esac
  [ "$parameter" = "$expected" ] || die "preset '$preset' takes $expected=VALUE, not $parameter"
  trimmed=${value%/}
  case $trimmed in
    ""|/*|*//*|*[!A-Za-z0-9_./%{}-]*) die "$parameter '$value': topic levels of letters, digits and _.- (no '+', '#' or empty level)" ;;
  esac
  case $preset in
    tasmota)
      whole="fulltopic '$value': a FullTopic has %prefix% and %topic% (or %hostname% or %id%)"
      case /$trimmed/ in */%prefix%/*) ;; *) die "$whole" ;; esac
      case /$trimmed/ in */%topic%/*|*/%hostname%/*|*/%id%/*) ;; *) die "$whole" ;; esac
      value=$trimmed/ ;;
    esphome|shelly)
      case /$value/ in
        */\{device\}/*) ;;
        */"$2"/) ;;
        *) die "topic_prefix '$value': {device} where the device's name is, or a prefix ending in the account's name $2 (its last level names the device)" ;;
      esac ;;
  esac
  case $preset:$value in
    esphome:*{device}*{device}*|shelly:*{device}*{device}*) die "$parameter '$value': {device} at most once" ;;
    esphome:*|shelly:*) rest=$(printf '%s' "$value" | sed 's|{device}||g') ;;
    *) rest=$value ;;
  esac
  case $rest in *[{}]*) die "$parameter '$value': no braces here but one {device} in a topic_prefix" ;; esac
}

# A FullTopic for prefix $1 and device $2: the first of %topic%, %hostname%, %id% is
# the device, the others any level (as the persister reads it).
fulltopic() {
  named=""
  for placeholder in %topic% %hostname% %id%; do
    case /$value in */$placeholder/*) named=$placeholder; break ;; esac
  done
  printf '%s' "$value" | sed -e "s|%prefix%|$1|g" -e "s|$named|$2|g" -e 's|%topic%|+|g; s|%hostname%|+|g; s|%id%|+|g'
}

# The device's own prefix for esphome and shelly (Gen2+): NAME, or the layout's.
own_prefix() {
  if [ -n "$value" ]; then printf '%s' "$value" | sed "s|{device}|$1|g"; else printf '%s' "$1"; fi
}

# A name (check_name passed) for a new account of preset $2: none of the services',
# none of the services' topics' last levels, and, for the presets whose topics start with the device's prefix (esphome, shelly's
# Gen2+: NAME, or the layout's), no topic root of others as its first level.
check_new_name() {
  lower=$(printf '%s' "$1" | tr 'A-Z' 'a-z')
  for service in $services; do
    [ "$lower" != "$service" ] || die "'$1' is a service's account, not a device name"
  done
  for taken in $seed_levels; do
    [ "$lower" != "$taken" ] || die "'$1' is the last level of a service's own topic (/sensor/temperature, /sensor/pressure, /device/status), whose payload names the device: choose another name"
  done
  case $2 in esphome|shelly) ;; *) return 0 ;; esac
  first=$(own_prefix "$1")
  first=${first%%/*}
  lower=$(printf '%s' "$first" | tr 'A-Z' 'a-z')
  for taken in $reserved; do
    [ "$lower" != "$(printf '%s' "$taken" | tr 'A-Z' 'a-z')" ] \
      || die "'$first' is the topic root of other devices or of the pipeline ($taken/...): choose another name or prefix"
  done
}

# Whether MQTT topic filters $1 and $2 match some topic in common, as the broker
# matches them: '+' any one level, '#' any levels after it and its parent level too
# (a/# matches a).
overlap() {
  a=$1 b=$2
  while :; do
    level_a=${a%%/*} level_b=${b%%/*}
    if [ "$level_a" = "#" ] || [ "$level_b" = "#" ]; then return 0; fi
    if [ "$level_a" != + ] && [ "$level_b" != + ] && [ "$level_a" != "$level_b" ]; then return 1; fi
    case $a in */*) a=${a#*/} more_a=true ;; *) more_a=false ;; esac
    case $b in */*) b=${b#*/} more_b=true ;; *) more_b=false ;; esac
    if ! $more_a && ! $more_b; then return 0; fi
    # One ended: the other matches its topic only with a last '#'.
    if ! $more_a; then [ "$b" = "#" ]; return; fi
    if ! $more_b; then [ "$a" = "#" ]; return; fi
  done
}

# The grants of an esphome node inside Home Assistant's space, by design: its discovery
# (homeassistant/+/NAME/#) and Home Assistant's status.
shared_by_design() {
  [ "$2" = esphome ] || return 1
  case $1 in "homeassistant/+/$3/#"|homeassistant/status) return 0 ;; esac
  return 1
}

# Refuses (exit 2, nothing written) an account whose ACL lines (stdin, from acl_of) for
# device $1 of preset $2 reach another topic space: a seed topic of the services, the
# space of another preset or of the pipeline, or another device account's topics (two
# accounts may only both read the same topics, like Tasmota's group commands).
check_reach() {
  seeds=$(sed -n 's/^topic write \([^+#]*\)$/\1/p' "$3/acl.services")
  while read -r kind mode filter; do
    [ "$kind" = topic ] || continue
    for seed in $seeds; do
      if overlap "$filter" "$seed"; then
        die "'$filter' would let device $1 reach $seed, where the payload names the device: choose another name or layout"
      fi
    done
    for space in $spaces; do
      owner=${space%%:*} space=${space#*:}
      [ "$owner" != "$2" ] || continue
      shared_by_design "$filter" "$2" "$1" && continue
      whose="$owner devices'"
      [ "$owner" != - ] || whose="the broker's"
      if overlap "$filter" "$space"; then
        die "'$filter' reaches into $space, $whose topics: choose another name or layout"
      fi
    done
    for other in "$4"/*.acl; do
      [ -f "$other" ] || continue
      other_name=$(basename "$other" .acl)
      other_preset=$(sed -n 's/^# device .*, preset \([^:]*\).*$/\1/p' "$other")
      while read -r other_kind other_mode other_filter; do
        [ "$other_kind" = topic ] || continue
        [ "$mode" = read ] && [ "$other_mode" = read ] && continue
        shared_by_design "$filter" "$2" "$1" && continue
        shared_by_design "$other_filter" "$other_preset" "$other_name" && continue
        if overlap "$filter" "$other_filter"; then
          die "'$filter' overlaps '$other_filter' of device $other_name: choose another name or layout"
        fi
      done < "$other"
    done
  done
}

# Checks the files a broker is about to read: every line of the ACL one Mosquitto
# knows (a line it does not know makes Mosquitto 2.0 run without any ACL), every line
# of the password file a user and a hash. Exits, naming the line, before the broker
# sees them.
check_files() {
  bad=$(grep -nvE '^(#.*|user [A-Za-z0-9][A-Za-z0-9_.-]*|topic (read|write|readwrite|deny) [^[:space:]]+|pattern (read|write|readwrite|deny) [^[:space:]]+|)$' "$1") || true
  [ -z "$bad" ] || die "$1 would have a line Mosquitto does not read (line $bad): nothing changed"
  bad=$(grep -nvE '^[A-Za-z0-9][A-Za-z0-9_.-]*:\$[0-9]+\$[^[:space:]:]+$' "$2") || true
  [ -z "$bad" ] || die "$2 would have a line that is not user:hash (line ${bad%%:*}): nothing changed"
}

# The largest message of a new account of preset $1, in bytes: DEVICE_MAX_MESSAGE
# (bytes, or a number with K or M), else the preset's default.
max_message() {
  size=${DEVICE_MAX_MESSAGE:-}
  if [ -z "$size" ]; then
    case $1 in sparkplug) echo 1048576 ;; *) echo 262144 ;; esac
    return 0
  fi
  case $size in
    *[Kk]) number=${size%?} factor=1024 ;;
    *[Mm]) number=${size%?} factor=1048576 ;;
    *) number=$size factor=1 ;;
  esac
  case $number in
    ""|*[!0-9]*|0*) die "--max-message '$size': expected bytes, or a number with K or M (64K), from 1 to 2M" ;;
  esac
  [ "${#number}" -le 8 ] || die "--max-message '$size': at most 2M (the edge broker's max_packet_size)"
  bytes=$((number * factor))
  [ "$bytes" -le 2097152 ] || die "--max-message '$size': at most 2M (the edge broker's max_packet_size)"
  echo "$bytes"
}

# The ACL lines of device $1 for preset $2.
acl_of() {
  name=$1
  echo "# device $name, preset ${spec:-$2}"
  echo "user $name"
  # Read by edge-relay (--accounts): the account's largest message.
  echo "# max-message $limit"
  case $2 in
    default) printf '%s\n' "topic write /sensor/$name/#" "topic write /device/$name/status" \
               "topic read /replay/$name/request" "topic write /replay/$name/gone" ;;
    tasmota)
      if [ -n "$value" ]; then
        printf '%s\n' "topic write $(fulltopic tele "$name")#" "topic write $(fulltopic stat "$name")#" \
          "topic read $(fulltopic cmnd "$name")#" "topic read $(fulltopic cmnd tasmotas)#"
      else
        printf '%s\n' "topic write tele/$name/#" "topic write stat/$name/#" \
          "topic read cmnd/$name/#" "topic read cmnd/tasmotas/#"
      fi ;;
    zigbee2mqtt) printf '%s\n' "topic readwrite ${value:-zigbee2mqtt}/#" ;;
    esphome) printf '%s\n' "topic readwrite $(own_prefix "$name")/#" "topic write homeassistant/+/$name/#" \
               "topic read homeassistant/status" ;;
    shelly) printf '%s\n' "topic readwrite shellies/$name/#" "topic read shellies/command" \
              "topic readwrite $(own_prefix "$name")/#" ;;
    homeassistant) printf '%s\n' "topic readwrite ${value:-homeassistant}/#" ;;
    # A Sparkplug B edge node NAME, in any group: its messages and its devices', the
    # commands to it, and the host's STATE.
    sparkplug) for type in NBIRTH NDATA NDEATH; do echo "topic write spBv1.0/+/$type/$name"; done
               for type in DBIRTH DDATA DDEATH; do echo "topic write spBv1.0/+/$type/$name/+"; done
               printf '%s\n' "topic read spBv1.0/+/NCMD/$name" "topic read spBv1.0/+/DCMD/$name/+" \
                 "topic read spBv1.0/STATE/+" ;;
    *) die "unknown preset '$2': expected default, tasmota, zigbee2mqtt, esphome, shelly, homeassistant or sparkplug" ;;
  esac
  echo
}

# What to set on the device, for preset $2.
hint() {
  address=${BROKER_ADDRESS:-<edge broker host>:1883}
  host=${address%:*}
  port=${address##*:}
  case $2 in
    default) echo "configure: LOCAL_BROKER=$host LOCAL_PORT=$port LOCAL_USERNAME=$1; publish readings to /sensor/$1/<measurement>, status to /device/$1/status (examples/esp32/)" ;;
    tasmota) echo "configure (Tasmota console): Backlog MqttHost $host; MqttPort $port; MqttUser $1; MqttPassword <password>; Topic $1${value:+; FullTopic $value}" ;;
    zigbee2mqtt) echo "configure (configuration.yaml): mqtt: {server: 'mqtt://$host:$port', user: $1, password: <password>, base_topic: ${value:-zigbee2mqtt}}" ;;
    esphome) echo "configure (node YAML): mqtt: {broker: $host, port: $port, username: $1, password: <password>, topic_prefix: $(own_prefix "$1")}" ;;
    shelly) echo "configure (Settings > MQTT): server $host:$port, user $1, password <password>; Gen1: the device id must be $1; Gen2+: MQTT prefix $(own_prefix "$1")" ;;
    homeassistant) echo "configure: MQTT integration broker $host:$port, user $1, password <password>; mqtt_statestream: {base_topic: ${value:-homeassistant}}" ;;
    sparkplug) echo "configure (the edge node's MQTT transmission): server tcp://$host:$port, user $1, password <password>, edge node id $1 (any group id), primary host id: the persister's --sparkplug-host-id" ;;
  esac
}

# Writes CONF_DIR's passwd and acl from the services' files and the devices'.
render() {
  devices=$(devices_dir "$1")
  # Always there, and its ACL files readable by others (names and topics, no secret):
  # edge-relay reads them (--accounts) to know each device account's topics and limit.
  mkdir -p "$devices"
  chmod 0755 "$devices"
  for file in "$devices"/*.acl; do
    if [ -f "$file" ]; then chmod 0644 "$file"; fi
  done
  old_umask=$(umask)
  umask 077
  cat "$1/passwd.services" > "$1/passwd.new"
  cat "$1/acl.services" > "$1/acl.new"
  if [ -d "$devices" ]; then
    for file in "$devices"/*.passwd; do
      if [ -f "$file" ]; then cat "$file" >> "$1/passwd.new"; fi
    done
    for file in "$devices"/*.acl; do
      if [ -f "$file" ]; then cat "$file" >> "$1/acl.new"; fi
    done
  fi
  umask "$old_umask"
  if ! (check_files "$1/acl.new" "$1/passwd.new"); then
    rm -f "$1/passwd.new" "$1/acl.new"
    exit 2
  fi
  if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto:mosquitto "$1/passwd.new" "$1/acl.new"
    [ ! -d "$devices" ] || chown -R mosquitto:mosquitto "$devices"
  fi
  mv "$1/passwd.new" "$1/passwd"
  mv "$1/acl.new" "$1/acl"
}

# Sends SIGHUP to the broker running with CONF_DIR/mosquitto.conf, if one is.
reload() {
  conf="$1/mosquitto.conf"
  found=false
  for proc in /proc/[0-9]*; do
    command=$(tr '\0' ' ' < "$proc/cmdline" 2>/dev/null) || continue
    program=${command%% *}
    [ "${program##*/}" = mosquitto ] || continue
    case " $command" in
      *" -c $conf "*) kill -HUP "${proc#/proc/}" && found=true ;;
    esac
  done
  if $found; then
    echo "the edge broker reads its accounts again (no restart)" >&2
  else
    echo "no running broker uses $conf: the change takes effect when it starts" >&2
  fi
}

[ $# -ge 2 ] || die "usage: device.sh add NAME PRESET CONF_DIR | remove NAME CONF_DIR | list CONF_DIR | render CONF_DIR"
case $1 in
  add)
    [ $# -eq 4 ] || die "usage: device.sh add NAME PRESET CONF_DIR"
    name=$2 spec=$3 dir=$(conf_dir "$4")
    check_name "$name"
    parse_preset "$spec" "$name"
    check_new_name "$name" "$preset"
    devices=$(devices_dir "$dir")
    [ ! -f "$devices/$name.passwd" ] || die "device '$name' exists already: remove-device it first to give it a new password"
    limit=$(max_message "$preset") || exit 2
    lines=$(acl_of "$name" "$preset")
    printf '%s\n' "$lines" | check_reach "$name" "$preset" "$dir" "$devices" || exit 2
    command -v mosquitto_passwd >/dev/null 2>&1 || die "mosquitto_passwd not found: install mosquitto"
    mkdir -p "$devices"
    # Made by scripts/add-device (scripts/lib.sh's random_secret); anything else must
    # be what Mosquitto's password file holds unchanged.
    password=${DEVICE_PASSWORD:-}
    case $password in
      '') die "DEVICE_PASSWORD is not set: add accounts with scripts/add-device, which makes one" ;;
      *[!A-Za-z0-9._~-]*) die "DEVICE_PASSWORD may hold only letters, digits and ._~-" ;;
    esac
    old_umask=$(umask)
    umask 077
    # Nothing half made is left behind: the account is whole, or it is not there.
    trap 'rm -f "$devices/$name.passwd.new" "$devices/$name.acl.new"' EXIT
    printf '%s:%s\n' "$name" "$password" > "$devices/$name.passwd.new"
    mosquitto_passwd -U "$devices/$name.passwd.new"
    acl_of "$name" "$preset" > "$devices/$name.acl.new"
    if ! (check_files "$devices/$name.acl.new" "$devices/$name.passwd.new"); then
      exit 2
    fi
    mv "$devices/$name.acl.new" "$devices/$name.acl"
    mv "$devices/$name.passwd.new" "$devices/$name.passwd"
    trap - EXIT
    umask "$old_umask"
    render "$dir"
    reload "$dir"
    echo "device $name (preset $spec) may now log in to the edge broker${BROKER_ADDRESS:+ at $BROKER_ADDRESS}"
    echo "user:     $name"
    echo "password: $password"
    sed -n 's/^topic /may:      /p' "$devices/$name.acl"
    echo "largest message: $limit bytes (edge-relay refuses larger ones)"
    hint "$name" "$preset"
    ;;
  remove)
    [ $# -eq 3 ] || die "usage: device.sh remove NAME CONF_DIR"
    name=$2 dir=$(conf_dir "$3")
    check_name "$name"
    devices=$(devices_dir "$dir")
    [ -f "$devices/$name.passwd" ] || die "no device '$name' (mosquitto/device.sh list shows them)"
    rm -f "$devices/$name.passwd" "$devices/$name.acl"
    render "$dir"
    reload "$dir"
    echo "device $name removed: it can no longer log in"
    ;;
  list)
    dir=$(conf_dir "$2")
    devices=$(devices_dir "$dir")
    for file in "$devices"/*.acl; do
      if [ -f "$file" ]; then sed -n 's/^# device \(.*\), preset \(.*\)$/\1 \2/p' "$file"; fi
    done
    ;;
  render)
    render "$(conf_dir "$2")"
    ;;
  *) die "unknown command '$1': expected add, remove, list or render" ;;
esac
