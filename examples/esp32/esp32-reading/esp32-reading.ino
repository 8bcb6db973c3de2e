// esp32-reading: an ESP32 that publishes this project's JSON reading form to the edge
// broker, so that the pipeline stores every reading once and `readings gaps` can tell
// whether any went missing.
//
//   /sensor/<DEVICE>/temperature  {"device":"<DEVICE>","boot":"3f9a1c","seq":42,
//                                  "ts":"2026-11-24T10:00:00.123Z","value":21.41,"unit":"°C"}
//   /device/<DEVICE>/status       online (retained) on connect; offline as the last will
//
// Readings go out at QoS 1 through ESP-IDF's MQTT client (part of the Arduino core for
// the ESP32, 2.x and 3.x): each is queued in the client's outbox and sent again until
// the broker acknowledges it, across short Wi-Fi and broker outages. The client drops
// an unacknowledged message after CONFIG_MQTT_OUTBOX_EXPIRED_TIMEOUT_MS (30 s unless
// the core was built otherwise): an outage longer than that loses readings, and
// `readings gaps` lists exactly which. `boot` is random per start, `seq` counts from 1, so the persister keeps each
// reading once however often it is delivered. `ts` is the ESP32's clock from NTP;
// until the clock is set it is left out and the persister uses the time it received
// the reading.
//
// Set the values below, then flash with the Arduino IDE or arduino-cli (board "ESP32
// Dev Module"). The account: scripts/add-device <DEVICE> (preset default) prints the
// user and password and the address of the edge broker.

#include <WiFi.h>
#include <time.h>
#include "mqtt_client.h"

// --- Set these -------------------------------------------------------------------
static const char *WIFI_SSID = "my-wifi";
static const char *WIFI_PASSWORD = "my-wifi-password";
static const char *BROKER_URI = "mqtt://192.168.1.10:1883";  // the edge broker
static const char *DEVICE = "esp32-0001";                   // as given to add-device
static const char *MQTT_PASSWORD = "printed-by-add-device";
static const uint32_t INTERVAL_MS = 5000;                   // one reading every 5 s
// ----------------------------------------------------------------------------------

static esp_mqtt_client_handle_t client;
static char boot_id[9];
static uint64_t seq = 0;
static char reading_topic[96];
static char status_topic[96];
static volatile bool connected = false;

// The measurement. The ESP32's own die temperature stands in for a real sensor:
// replace it with yours (and the topic's last level and the unit with its own).
static float read_sensor() {
  return temperatureRead();
}

static void on_mqtt_event(void *, esp_event_base_t, int32_t event_id, void *data) {
  esp_mqtt_event_handle_t event = (esp_mqtt_event_handle_t)data;
  switch (event->event_id) {
    case MQTT_EVENT_CONNECTED:
      connected = true;
      // Retained, so the pipeline and a late subscriber see the device online.
      esp_mqtt_client_publish(client, status_topic, "online", 0, 1, 1);
      Serial.println("mqtt: connected");
      break;
    case MQTT_EVENT_DISCONNECTED:
      connected = false;
      Serial.println("mqtt: disconnected, the client reconnects by itself");
      break;
    default:
      break;
  }
}

// `ts` as the pipeline reads it (RFC 3339, UTC, milliseconds), or false before NTP.
static bool now_rfc3339(char *out, size_t size) {
  struct timeval tv;
  gettimeofday(&tv, nullptr);
  if (tv.tv_sec < 1700000000) return false;  // the clock is not set yet
  struct tm utc;
  gmtime_r(&tv.tv_sec, &utc);
  size_t n = strftime(out, size, "%Y-%m-%dT%H:%M:%S", &utc);
  snprintf(out + n, size - n, ".%03ldZ", (long)(tv.tv_usec / 1000));
  return true;
}

void setup() {
  Serial.begin(115200);
  snprintf(boot_id, sizeof boot_id, "%08lx", (unsigned long)esp_random());
  snprintf(reading_topic, sizeof reading_topic, "/sensor/%s/temperature", DEVICE);
  snprintf(status_topic, sizeof status_topic, "/device/%s/status", DEVICE);

  WiFi.mode(WIFI_STA);
  WiFi.setAutoReconnect(true);
  WiFi.begin(WIFI_SSID, WIFI_PASSWORD);
  configTime(0, 0, "pool.ntp.org", "time.nist.gov");

  esp_mqtt_client_config_t config = {};
#if ESP_IDF_VERSION_MAJOR >= 5
  config.broker.address.uri = BROKER_URI;
  config.credentials.client_id = DEVICE;
  config.credentials.username = DEVICE;
  config.credentials.authentication.password = MQTT_PASSWORD;
  config.session.last_will.topic = status_topic;
  config.session.last_will.msg = "offline";
  config.session.last_will.qos = 1;
  config.session.last_will.retain = 1;
  config.session.keepalive = 30;
#else
  config.uri = BROKER_URI;
  config.client_id = DEVICE;
  config.username = DEVICE;
  config.password = MQTT_PASSWORD;
  config.lwt_topic = status_topic;
  config.lwt_msg = "offline";
  config.lwt_qos = 1;
  config.lwt_retain = 1;
  config.keepalive = 30;
#endif
  client = esp_mqtt_client_init(&config);
  esp_mqtt_client_register_event(client, MQTT_EVENT_ANY, on_mqtt_event, nullptr);
  esp_mqtt_client_start(client);
  Serial.printf("device %s, boot %s\n", DEVICE, boot_id);
}

void loop() {
  static uint32_t last = 0;
  if (millis() - last < INTERVAL_MS) {
    delay(10);
    return;
  }
  last = millis();

  char ts[40];
  char ts_field[56] = "";
  if (now_rfc3339(ts, sizeof ts)) snprintf(ts_field, sizeof ts_field, "\"ts\":\"%s\",", ts);
  char payload[256];
  int length = snprintf(payload, sizeof payload,
                        "{\"device\":\"%s\",\"boot\":\"%s\",\"seq\":%llu,%s\"value\":%.2f,\"unit\":\"°C\"}",
                        DEVICE, boot_id, (unsigned long long)(seq + 1), ts_field, read_sensor());
  // Queued in the outbox even while disconnected (store = true), sent at QoS 1 and
  // repeated until acknowledged. A full outbox refuses it: that seq is not used, so
  // no gap is made that the device could not explain.
  int id = esp_mqtt_client_enqueue(client, reading_topic, payload, length, 1, 0, true);
  if (id >= 0) {
    seq++;
  } else {
    Serial.println("mqtt: outbox full, reading dropped before it got a seq");
  }
}
