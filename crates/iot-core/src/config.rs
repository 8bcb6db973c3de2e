//! Configuration shared by the binaries: `.env` loading, one-line errors for bad
//! settings (exit code 2), broker settings with their `LOCAL_*` environment fallbacks,
//! and the value parsers the flags use.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgMatches, Command, CommandFactory, FromArgMatches};
use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};

/// Exit code of a missing or malformed setting (as clap uses for usage errors).
pub const EXIT_BAD_SETTING: i32 = 2;

/// Loads `.env`, parses the command line and environment into `T`, and exits with a
/// one-line error naming the setting (exit code 2) when something is wrong.
pub fn load<T: CommandFactory + FromArgMatches>() -> T {
    load_with(T::command(), std::env::args_os())
}

/// As [`load`], for a command whose arguments were adjusted at run time (for example
/// per-binary defaults and environment names).
pub fn load_with<T: FromArgMatches>(
    command: Command,
    args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
) -> T {
    if let Err(message) = load_dotenv() {
        exit_bad_setting(&message);
    }
    match try_parse(command, args) {
        Ok(value) => value,
        Err(ParseOutcome::Exit(error)) => error.exit(),
        Err(ParseOutcome::Bad(message)) => exit_bad_setting(&message),
    }
}

/// Prints `error: <message>` and exits with [`EXIT_BAD_SETTING`], for settings that
/// parse but do not fit together.
pub fn exit_bad_setting(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(EXIT_BAD_SETTING)
}

/// Reads `.env` from the working directory when there is one; variables already set
/// in the environment win.
fn load_dotenv() -> Result<(), String> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(error) if error.not_found() => Ok(()),
        Err(error) => Err(format!(".env: {error}")),
    }
}

/// Why parsing did not give a value.
#[derive(Debug)]
pub enum ParseOutcome {
    /// `--help` or `--version`: clap prints it and exits 0.
    Exit(clap::Error),
    /// A bad setting, as one line without the `error:` prefix.
    Bad(String),
}

/// Parses `args` with `command` into `T`, turning clap's multi-line errors into one
/// line that names both the flag and its environment variable.
pub fn try_parse<T: FromArgMatches>(
    command: Command,
    args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
) -> Result<T, ParseOutcome> {
    let mut command = command;
    let matches: ArgMatches = command
        .try_get_matches_from_mut(args)
        .map_err(|error| outcome(error, &command))?;
    T::from_arg_matches(&matches).map_err(|error| outcome(error, &command))
}

fn outcome(error: clap::Error, command: &Command) -> ParseOutcome {
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return ParseOutcome::Exit(error);
    }
    let rendered = error.render().to_string();
    // clap's message, without its usage and help hints, folded onto one line.
    let line = rendered
        .lines()
        .take_while(|line| !line.starts_with("Usage:") && !line.starts_with("For more information"))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_string();
    // Name the environment variable too: the value may well have come from there.
    let env = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => env_of(command, arg),
        Some(ContextValue::Strings(args)) => args.first().and_then(|arg| env_of(command, arg)),
        _ => None,
    };
    match env {
        Some(env) if !line.contains(&env) => ParseOutcome::Bad(format!("{line} (flag or {env})")),
        _ => ParseOutcome::Bad(line),
    }
}

/// The environment variable behind an argument as clap renders it (`--port <PORT>`).
fn env_of(command: &Command, rendered: &str) -> Option<String> {
    let long = rendered
        .trim_start_matches('-')
        .split([' ', '=', '<'])
        .next()?;
    command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .and_then(|arg| arg.get_env())
        .map(|env| env.to_string_lossy().into_owned())
}

/// Parses a QoS level `0`, `1` or `2`.
pub fn parse_qos(value: &str) -> Result<QoS, String> {
    match value.trim() {
        "0" => Ok(QoS::AtMostOnce),
        "1" => Ok(QoS::AtLeastOnce),
        "2" => Ok(QoS::ExactlyOnce),
        _ => Err("expected 0, 1 or 2".into()),
    }
}

/// Parses a non-negative number of seconds, fractions allowed (`3`, `0.5`, `0`).
pub fn parse_seconds(value: &str) -> Result<Duration, String> {
    let seconds: f64 = value
        .trim()
        .parse()
        .map_err(|_| "expected a number of seconds such as 3 or 0.5".to_string())?;
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| "expected a finite, non-negative number of seconds".to_string())
}

/// Parses a positive number of seconds, fractions allowed (`30`, `0.5`).
pub fn parse_positive_seconds(value: &str) -> Result<Duration, String> {
    match parse_seconds(value)? {
        duration if duration.is_zero() => Err("expected more than 0 seconds".into()),
        duration => Ok(duration),
    }
}

/// Parses a positive duration: seconds (`90`, `0.5`) or with a unit (`30s`, `10m`, `2h`).
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration = parse_seconds(value)
        .or_else(|_| humantime::parse_duration(value.trim()).map_err(|_| ()))
        .map_err(|()| "expected a duration such as 90, 30s, 10m or 2h".to_string())?;
    if duration.is_zero() {
        return Err("expected a duration longer than 0".into());
    }
    Ok(duration)
}

/// Bytes, plain or with a binary unit: `1048576`, `512K`, `512M`, `20G`, `1T` (KiB,
/// MiB, GiB, TiB; `MB` and `MiB` read the same).
pub fn parse_bytes(value: &str) -> Result<u64, String> {
    let bad = || format!("expected a size such as 512M or 20G, not {value:?}");
    let text = value.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(bad()),
    };
    number.checked_mul(1 << shift).ok_or_else(bad)
}

/// Parses a path that must name a readable file.
pub fn parse_existing_file(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(path),
        Ok(_) => Err(format!("{value} is not a file")),
        Err(error) => Err(format!("cannot read {value}: {error}")),
    }
}

/// Declares the clap arguments of one side's broker, with environment fallbacks
/// `<PREFIX>_BROKER`, `_PORT`, `_USERNAME`, `_PASSWORD`, `_TLS_CA`, `_KEEP_ALIVE`.
/// `$long` goes before each flag's name (`--local-broker`) for a binary that talks to both
/// brokers.
macro_rules! broker_args {
    ($(#[$meta:meta])* $name:ident, $prefix:literal, $heading:literal) => {
        broker_args!($(#[$meta])* $name, $prefix, $heading, "", "Host name or address of the broker");
    };
    ($(#[$meta:meta])* $name:ident, $prefix:literal, $heading:literal, $long:literal, $host_help:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, clap::Args)]
        #[command(next_help_heading = $heading)]
        pub struct $name {
            #[doc = $host_help]
            #[arg(id = concat!($long, "host"), value_name = "HOST", long = concat!($long, "broker"), env = concat!($prefix, "_BROKER"), default_value = "localhost")]
            pub host: String,
            /// Port of the broker [default: 1883, or 8883 with TLS]
            #[arg(id = concat!($long, "port"), value_name = "PORT", long = concat!($long, "port"), env = concat!($prefix, "_PORT"), value_parser = clap::value_parser!(u16).range(1..))]
            pub port: Option<u16>,
            /// User name to log in with
            #[arg(id = concat!($long, "username"), value_name = "USERNAME", long = concat!($long, "username"), env = concat!($prefix, "_USERNAME"))]
            pub username: Option<String>,
            /// Password to log in with (needs a user name)
            #[arg(id = concat!($long, "password"), value_name = "PASSWORD", long = concat!($long, "password"), env = concat!($prefix, "_PASSWORD"), hide_env_values = true, requires = concat!($long, "username"))]
            pub password: Option<String>,
            /// CA certificate file (PEM); setting it turns TLS on
            #[arg(id = concat!($long, "tls_ca"), long = concat!($long, "tls-ca"), value_name = "FILE", env = concat!($prefix, "_TLS_CA"), value_parser = parse_existing_file)]
            pub tls_ca: Option<PathBuf>,
            /// Seconds between keep-alive pings
            #[arg(id = concat!($long, "keep_alive"), long = concat!($long, "keep-alive"), value_name = "SECONDS", env = concat!($prefix, "_KEEP_ALIVE"), default_value = "30", value_parser = clap::value_parser!(u16).range(5..))]
            pub keep_alive: u16,
        }

        impl From<$name> for BrokerSettings {
            fn from(args: $name) -> Self {
                BrokerSettings {
                    host: args.host,
                    port: args.port.unwrap_or(if args.tls_ca.is_some() { 8883 } else { 1883 }),
                    username: args.username,
                    password: args.password,
                    tls_ca: args.tls_ca,
                    keep_alive: Duration::from_secs(args.keep_alive.into()),
                    env_prefix: $prefix,
                }
            }
        }
    };
}

broker_args!(
    /// The edge ("local") broker the sensors, `device-status` and `mqtt-subscriber` use.
    LocalBroker,
    "LOCAL",
    "Local broker"
);

broker_args!(
    /// The cloud broker, for `readings` (which asks devices for missing readings over it).
    CloudBroker,
    "CLOUD",
    "Cloud broker"
);

broker_args!(
    /// The cloud broker `mongo-persister` reads from, or the NATS JetStream cluster.
    PersisterCloudBroker,
    "CLOUD",
    "Cloud broker",
    "",
    "Host name or address of the broker; or the NATS JetStream cluster instead, as nats://HOST:PORT of its nodes separated by commas (no --port; TLS with --tls-ca)"
);

broker_args!(
    /// The edge broker `edge-relay` takes every message from: `--local-broker` and so on.
    RelayLocalBroker,
    "LOCAL",
    "Local (edge) broker",
    "local-",
    "Host name or address of the broker"
);

broker_args!(
    /// The cloud broker `edge-relay` forwards to: `--cloud-broker` and so on.
    RelayCloudBroker,
    "CLOUD",
    "Cloud broker",
    "cloud-",
    "Host name or address of the broker; or the NATS JetStream cluster instead, as nats://HOST:PORT of its nodes separated by commas (no --cloud-port; TLS with --cloud-tls-ca)"
);

/// Largest MQTT packet our clients send or accept: above the brokers' `max_packet_size`
/// (2 MiB), so a message a broker accepted always reaches them. rumqttc's default of
/// 10 KiB broke the connection on every delivery of a larger message, which the broker
/// then delivered again, for ever.
pub const MAX_PACKET_SIZE: usize = 4 * 1024 * 1024;

/// Where and how to connect to one broker; builds the client options itself.
#[derive(Clone)]
pub struct BrokerSettings {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub keep_alive: Duration,
    /// `LOCAL` or `CLOUD`: names the variables in error messages.
    pub env_prefix: &'static str,
}

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls_ca", &self.tls_ca)
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

impl BrokerSettings {
    /// The NATS cluster when the host is `nats://…` addresses, `None` for an MQTT
    /// broker; a one-line error naming the setting when the addresses are malformed or
    /// come with a port. With a CA file, TLS to every node.
    pub fn nats(&self, port_given: bool) -> Result<Option<crate::nats::NatsSettings>, String> {
        if !crate::nats::is_nats(&self.host) {
            return Ok(None);
        }
        let prefix = self.env_prefix;
        if port_given {
            return Err(format!(
                "{prefix}_PORT with a nats:// address in {prefix}_BROKER: give each node's port in the address"
            ));
        }
        crate::nats::NatsSettings::parse(&self.host, self.username.clone(), self.password.clone())
            .map(|settings| Some(settings.with_tls_ca(self.tls_ca.clone())))
            .map_err(|why| format!("{prefix}_BROKER: {why}"))
    }

    /// `host:port`, with `tls://` in front when TLS is on; never the password.
    pub fn address(&self) -> String {
        let scheme = if self.tls_ca.is_some() { "tls://" } else { "" };
        format!("{scheme}{}:{}", self.host, self.port)
    }

    /// Client options for this broker: credentials, keep-alive and TLS applied.
    pub fn mqtt_options(
        &self,
        client_id: &str,
        clean_session: bool,
    ) -> anyhow::Result<MqttOptions> {
        let mut options = MqttOptions::new(client_id, &self.host, self.port);
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_session(clean_session)
            .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE);
        if let Some(username) = &self.username {
            options.set_credentials(username, self.password.as_deref().unwrap_or_default());
        }
        if let Some(transport) = self.tls_transport()? {
            options.set_transport(transport);
        }
        Ok(options)
    }

    /// MQTT 5 client options for this broker, for a client that must see the retain flag
    /// as it was published or keep its own publishes from coming back (`edge-relay`): as
    /// [`BrokerSettings::mqtt_options`], and a persistent session (`clean_start` false)
    /// that the broker keeps while the client is away, as long as it can (MQTT 5 ends a
    /// session at disconnect unless its expiry interval says otherwise).
    pub fn mqtt5_options(
        &self,
        client_id: &str,
        clean_start: bool,
    ) -> anyhow::Result<rumqttc::v5::MqttOptions> {
        let mut options = rumqttc::v5::MqttOptions::new(client_id, &self.host, self.port);
        let max_packet = u32::try_from(MAX_PACKET_SIZE).unwrap_or(u32::MAX);
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_start(clean_start)
            .set_max_packet_size(Some(max_packet));
        if !clean_start {
            options.set_session_expiry_interval(Some(u32::MAX));
        }
        if let Some(username) = &self.username {
            options.set_credentials(username, self.password.as_deref().unwrap_or_default());
        }
        if let Some(transport) = self.tls_transport()? {
            options.set_transport(transport);
        }
        Ok(options)
    }

    /// The TLS transport when a CA file is set.
    fn tls_transport(&self) -> anyhow::Result<Option<Transport>> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let variable = format!("{}_TLS_CA", self.env_prefix);
        let config = tls_config(ca).with_context(|| format!("{variable}={}", ca.display()))?;
        Ok(Some(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        ))))
    }
}

/// A TLS client configuration that trusts exactly the certificates in `ca`.
fn tls_config(ca: &std::path::Path) -> anyhow::Result<rustls::ClientConfig> {
    let pem = std::fs::read(ca).context("cannot read the CA file")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots
            .add(cert.context("malformed certificate in the CA file")?)
            .context("unusable certificate in the CA file")?;
    }
    anyhow::ensure!(!roots.is_empty(), "no PEM certificate in the CA file");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS set-up")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        broker: LocalBroker,
        #[arg(long, env = "PROBE_QOS", value_parser = parse_qos, default_value = "0")]
        qos: QoS,
        #[arg(long, env = "PROBE_INTERVAL", value_parser = parse_seconds, default_value = "3")]
        interval: Duration,
    }

    fn parse(args: &[&str]) -> Result<Probe, String> {
        let args = std::iter::once("probe").chain(args.iter().copied());
        try_parse::<Probe>(Probe::command(), args).map_err(|outcome| match outcome {
            ParseOutcome::Bad(line) => line,
            ParseOutcome::Exit(error) => format!("exit: {error}"),
        })
    }

    #[test]
    fn defaults_follow_the_configuration_contract() {
        let probe = parse(&[]).expect("defaults parse");
        let broker = BrokerSettings::from(probe.broker);
        assert_eq!(broker.address(), "localhost:1883");
        assert_eq!(broker.username, None);
        assert_eq!(probe.qos, QoS::AtMostOnce);
        assert_eq!(probe.interval, Duration::from_secs(3));
    }

    #[test]
    fn fractional_interval_and_qos_parse() {
        let probe = parse(&["--interval", "0.5", "--qos", "1"]).expect("parses");
        assert_eq!(probe.interval, Duration::from_millis(500));
        assert_eq!(probe.qos, QoS::AtLeastOnce);
    }

    #[test]
    fn a_bad_value_is_one_line_naming_flag_and_variable() {
        let error = parse(&["--port", "http"]).expect_err("port must be a number");
        assert!(!error.contains('\n'), "{error}");
        assert!(error.contains("--port"), "{error}");
        assert!(error.contains("LOCAL_PORT"), "{error}");

        let error = parse(&["--qos", "3"]).expect_err("qos 3 does not exist");
        assert!(
            error.contains("--qos") && error.contains("PROBE_QOS"),
            "{error}"
        );
        assert!(error.contains("expected 0, 1 or 2"), "{error}");

        let error = parse(&["--interval=-1"]).expect_err("negative interval");
        assert!(error.contains("--interval"), "{error}");
    }

    #[test]
    fn durations_take_seconds_or_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn a_password_needs_a_user_name() {
        let error = parse(&["--password", "secret"]).expect_err("password alone");
        assert!(error.contains("--username"), "{error}");
    }

    #[test]
    fn a_missing_ca_file_is_refused_at_parse_time() {
        let error = parse(&["--tls-ca", "/nonexistent/ca.pem"]).expect_err("missing CA");
        assert!(error.contains("LOCAL_TLS_CA"), "{error}");
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }

    #[test]
    fn tls_defaults_to_port_8883_and_rejects_a_file_without_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").expect("write");
        let probe = parse(&["--tls-ca", ca.to_str().expect("utf-8 path")]).expect("parses");
        let broker = BrokerSettings::from(probe.broker);
        assert_eq!(broker.port, 8883);
        assert!(broker.address().starts_with("tls://"));
        let error = broker
            .mqtt_options("probe", true)
            .expect_err("no certificate");
        let message = format!("{error:#}");
        assert!(message.contains("LOCAL_TLS_CA"), "{message}");
        assert!(message.contains("no PEM certificate"), "{message}");
    }

    #[test]
    fn the_password_is_not_in_debug_output() {
        let probe = parse(&["--username", "u", "--password", "hunter2"]).expect("parses");
        let broker = BrokerSettings::from(probe.broker);
        assert!(!format!("{broker:?}").contains("hunter2"));
    }
}
