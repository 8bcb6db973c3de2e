//! Device accounts: which account may write a topic, how large its messages may be,
//! and its share of the log (bytes not forwarded yet), so that one account's flood
//! costs the others seconds, not minutes.
//!
//! The relay reads the accounts from the edge broker's own ACL (`--accounts`: the `acl`
//! file `mosquitto/device.sh` renders, or its `devices/` folder): a device account is a
//! `user` block after a `# device NAME, preset P` line, its topics are its `write` and
//! `readwrite` filters (which the broker enforces, and which `add-device` keeps apart
//! from every other account's), its size limit is its `# max-message BYTES` line
//! (`--max-message` when it has none). A topic no device account may write is the
//! services' (this project's own sensors, status, the relay's and persister's
//! requests): trusted, held only by the whole disk budget.
//!
//! The relay has one MQTT session with the edge broker for every account. Holding one
//! account's messages back (not acknowledging them) would fill the broker's in-flight
//! window to the relay (its receive maximum) with that account's messages, and the
//! others' would queue behind them in the broker's memory. So an account past its share
//! is *refused*, as a message too large is: acknowledged to the edge broker without
//! being written, counted in `iot_relay_refused_total`, logged once a minute per account
//! and reason. What one account can still cost the others is its share, forwarded ahead
//! of what they send after it (the log is forwarded in order).
//!
//! Why in order, not interleaved by account as a backlog drains: exactly once rests on
//! the log's order (one forwarded mark below which everything was acknowledged, QoS 2
//! packet ids given by a message's number, no two in flight 2 000 numbers apart; in the
//! NATS tier, the message's number in its id). Cursors per account would put messages
//! in flight far apart in the log, and a crash would leave no single mark to start
//! again from. The share bounds what interleaving would save: at most one share per
//! account ahead of an honest reading.
//!
//! A relay started again counts what its log holds not forwarded yet against each
//! account ([`Accounts::count_backlog`]): a restart during an outage gives no account
//! its share a second time.
//!
//! The file is read again when it changes (looked at once a second, and before a topic
//! is taken for a service's, so that a device account just added is known from its
//! first message). A file that
//! cannot be read or parsed fails closed: every topic is then one unknown account's,
//! with a device account's share and size limit, until it can be read again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::log::Log;

/// What a message is counted as against a share or the budget: its topic and payload,
/// and about what the store spends on each besides (key, index entry, framing).
pub const OVERHEAD: u64 = 128;

/// The bytes a message of `topic` and `payload` bytes is counted as.
pub fn cost(topic: usize, payload: usize) -> u64 {
    (topic + payload) as u64 + OVERHEAD
}

/// How often the accounts file is looked at for a change.
const RECHECK: Duration = Duration::from_secs(1);
/// How often a refusal is logged per account and reason.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// The account every topic belongs to while the accounts cannot be read.
const UNKNOWN: &str = "(accounts unreadable)";

/// One device account of the edge broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    /// Its `write` and `readwrite` topic filters.
    pub filters: Vec<String>,
    /// Its largest message (payload bytes), when its block names one.
    pub max_message: Option<u64>,
}

/// Parses an edge broker ACL (the services' blocks, then the devices'): the device
/// accounts, in order.
pub fn parse(text: &str) -> Result<Vec<Account>, String> {
    let mut accounts: Vec<Account> = Vec::new();
    // The device named by the last `# device` line, until its `user` line.
    let mut announced: Option<String> = None;
    // Whether the current `user` block is a device's (the last of `accounts`).
    let mut in_device = false;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        let bad = |why: &str| format!("line {}: {why}: {line:?}", number + 1);
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim();
            if let Some(rest) = comment.strip_prefix("device ") {
                let name = rest.split(',').next().unwrap_or_default().trim();
                announced = Some(name.to_owned());
            } else if let Some(size) = comment.strip_prefix("max-message ") {
                let size = crate::config::parse_bytes(size).map_err(|why| bad(&why))?;
                match (in_device, accounts.last_mut()) {
                    (true, Some(account)) => account.max_message = Some(size),
                    _ => return Err(bad("a max-message outside a device's block")),
                }
            }
            continue;
        }
        let mut words = line.split_whitespace();
        match words.next() {
            None => {}
            Some("user") => {
                let name = words.next().ok_or_else(|| bad("a user without a name"))?;
                in_device = announced.take().is_some_and(|device| device == name);
                if in_device {
                    accounts.push(Account {
                        name: name.to_owned(),
                        filters: Vec::new(),
                        max_message: None,
                    });
                }
            }
            Some("topic") => {
                let (mode, filter) = match (words.next(), words.next()) {
                    (Some(mode), Some(filter)) => (mode, filter),
                    (Some(filter), None) => ("readwrite", filter),
                    _ => return Err(bad("a topic line without a filter")),
                };
                if in_device && matches!(mode, "write" | "readwrite") {
                    if let Some(account) = accounts.last_mut() {
                        account.filters.push(filter.to_owned());
                    }
                }
            }
            // Patterns apply to every account; the project's ACLs have none.
            Some("pattern") => {}
            Some(_) => return Err(bad("not an ACL line")),
        }
    }
    Ok(accounts)
}

/// Whether MQTT topic filter `filter` matches `topic` (`+` one level, `#` any levels
/// after it and its parent level too).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        if level == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(got) if level == "+" || level == got => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

/// Why a message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// Larger than its account's limit.
    TooLarge,
    /// Its account has its share of the log not forwarded yet.
    OverShare,
}

impl Refused {
    fn label(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::OverShare => "over_share",
        }
    }
}

/// What the relay knows of the accounts, and what each has in the log.
#[derive(Debug)]
pub struct Accounts {
    /// `--accounts`; without it there are no device accounts (every topic a service's).
    source: Option<PathBuf>,
    /// `--max-message`: a device account's limit when its block names none.
    max_message: u64,
    /// `--account-share`: bytes one account may have in the log not forwarded yet.
    share: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The device accounts; `None` while the file cannot be read (fail closed).
    table: Option<Vec<Account>>,
    /// The file as last read (modified time, length, inode).
    stamp: Option<(std::time::SystemTime, u64, u64)>,
    checked: Option<Instant>,
    /// Whether the last read failed (said once).
    failing: bool,
    /// Bytes each account has in the log (or waiting for it) not forwarded yet.
    unforwarded: HashMap<String, u64>,
    /// The first message number the forwarder has not read yet.
    forwarding: u64,
    /// When a refusal was last logged, per account and reason.
    logged: HashMap<(String, Refused), Instant>,
}

impl Accounts {
    /// Reads the accounts from `source` (a file that cannot be read fails closed).
    pub fn new(source: Option<PathBuf>, max_message: u64, share: u64) -> Self {
        let accounts = Self {
            source,
            max_message,
            share,
            state: Mutex::new(State::default()),
        };
        if accounts.source.is_none() {
            tracing::warn!("no --accounts: every topic is counted as the services', with no device account's share or size limit");
        }
        accounts.refresh(&mut accounts.lock(), Instant::now());
        accounts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the file again if it changed since it was last read.
    fn refresh(&self, state: &mut State, now: Instant) {
        let Some(source) = &self.source else { return };
        if state
            .checked
            .is_some_and(|at| now.duration_since(at) < RECHECK)
        {
            return;
        }
        state.checked = Some(now);
        let stamp = stamp(source).ok();
        if stamp.is_some() && stamp == state.stamp && state.table.is_some() {
            return;
        }
        match read(source) {
            Ok(table) => {
                if state.table.as_ref() != Some(&table) {
                    tracing::info!(
                        accounts = table.len(),
                        file = %source.display(),
                        "device accounts read"
                    );
                }
                state.table = Some(table);
                state.stamp = stamp;
                state.failing = false;
            }
            Err(error) => {
                if !state.failing {
                    state.failing = true;
                    tracing::error!(
                        "the device accounts cannot be read ({error:#}): every topic counts as one unknown account's, with one share and a device's size limit, until they can"
                    );
                }
                state.table = None;
                state.stamp = None;
            }
        }
    }

    /// The device account that may write `topic` and its size limit; `None` for a
    /// service's topic.
    fn account_of<'a>(&self, state: &'a State, topic: &str) -> Option<(&'a str, u64)> {
        self.source.as_ref()?;
        let Some(table) = &state.table else {
            return Some((UNKNOWN, self.max_message));
        };
        table
            .iter()
            .find(|account| account.filters.iter().any(|filter| matches(filter, topic)))
            .map(|account| {
                (
                    account.name.as_str(),
                    account.max_message.unwrap_or(self.max_message),
                )
            })
    }

    /// Whether a message of `topic` with `payload` bytes is taken into the log; counts
    /// it against its account's share if so, counts and logs it if not.
    pub fn admit(&self, topic: &str, payload: usize) -> Result<(), Refused> {
        let now = Instant::now();
        let mut state = self.lock();
        self.refresh(&mut state, now);
        if self.source.is_some() && self.account_of(&state, topic).is_none() {
            // Perhaps a device account added since the last look: its first message
            // comes once the broker has read the new file, so the file says so now.
            state.checked = None;
            self.refresh(&mut state, now);
        }
        let Some((account, limit)) = self.account_of(&state, topic) else {
            return Ok(());
        };
        let account = account.to_owned();
        let cost = cost(topic.len(), payload);
        let held = state.unforwarded.get(&account).copied().unwrap_or(0);
        let refused = if payload as u64 > limit {
            Refused::TooLarge
        } else if held + cost > self.share {
            Refused::OverShare
        } else {
            *state.unforwarded.entry(account).or_default() += cost;
            return Ok(());
        };
        metrics::counter!("iot_relay_refused_total", "reason" => refused.label()).increment(1);
        let key = (account, refused);
        if state
            .logged
            .get(&key)
            .is_none_or(|at| now.duration_since(*at) >= LOG_EVERY)
        {
            let account = &key.0;
            match refused {
                Refused::TooLarge => tracing::warn!(
                    account,
                    topic,
                    bytes = payload,
                    limit,
                    "a message larger than its device account's limit: acknowledged to the edge broker and not forwarded (iot_relay_refused_total{{reason=\"too_large\"}}; logged once a minute per account)"
                ),
                Refused::OverShare => tracing::warn!(
                    account,
                    topic,
                    held,
                    share = self.share,
                    "a device account has its share of the log not forwarded yet (--account-share): its messages are acknowledged to the edge broker and not forwarded until the cloud takes some (iot_relay_refused_total{{reason=\"over_share\"}}; logged once a minute per account)"
                ),
            }
            state.logged.insert(key, now);
        }
        Err(refused)
    }

    /// Counts the messages `log` holds not forwarded yet against their accounts' shares,
    /// as the run of the relay that took them did; returns how many messages and bytes
    /// it counted for device accounts. Reads the backlog once, 16 MiB at a time (at most
    /// `--max-disk`): before the intake and the forwarder start, so that the forwarder
    /// takes each off what was counted.
    pub fn count_backlog(&self, log: &Log) -> anyhow::Result<(u64, u64)> {
        if self.source.is_none() {
            return Ok((0, 0));
        }
        let mut state = self.lock();
        self.refresh(&mut state, Instant::now());
        let (mut messages, mut bytes) = (0, 0);
        let mut from = log.forwarded().max(log.first());
        loop {
            let read = log.read_from(from, 1024, 16 << 20)?;
            let Some(&(last, _)) = read.last() else {
                break;
            };
            for (_, entry) in &read {
                let Some((account, _)) = self.account_of(&state, &entry.topic) else {
                    continue;
                };
                let account = account.to_owned();
                let cost = cost(entry.topic.len(), entry.payload.len());
                *state.unforwarded.entry(account).or_default() += cost;
                (messages, bytes) = (messages + 1, bytes + cost);
            }
            from = last + 1;
        }
        Ok((messages, bytes))
    }

    /// A message admitted that will not be written after all (a copy the broker sends
    /// again, or one the log has).
    pub fn unadmit(&self, topic: &str, payload: usize) {
        let mut state = self.lock();
        self.release(&mut state, topic, payload);
    }

    /// The forwarder read message `number` of the log to send it: no longer its
    /// account's backlog. (Read again, for a refill or a reconnect, it is not counted
    /// again.)
    pub fn forwarding(&self, number: u64, topic: &str, payload: usize) {
        let mut state = self.lock();
        if number < state.forwarding {
            return;
        }
        state.forwarding = number + 1;
        self.release(&mut state, topic, payload);
    }

    fn release(&self, state: &mut State, topic: &str, payload: usize) {
        let Some((account, _)) = self.account_of(state, topic) else {
            return;
        };
        let account = account.to_owned();
        if let Some(held) = state.unforwarded.get_mut(&account) {
            *held = held.saturating_sub(cost(topic.len(), payload));
            if *held == 0 {
                state.unforwarded.remove(&account);
            }
        }
    }
}

fn stamp(path: &Path) -> std::io::Result<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok((meta.modified()?, meta.len(), meta.ino()))
}

/// The device accounts of an ACL file, or of the `*.acl` files of a folder.
fn read(path: &Path) -> anyhow::Result<Vec<Account>> {
    let text = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|file| file.extension().is_some_and(|ext| ext == "acl"))
            .collect();
        files.sort();
        let mut text = String::new();
        for file in files {
            text += &std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            text.push('\n');
        }
        text
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    parse(&text).map_err(|why| anyhow::anyhow!("{}: {why}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACL: &str = "\
user temperature-sensor
topic write /sensor/+/temperature

# device meter-1, preset tasmota
user meter-1
topic write tele/meter-1/#
topic write stat/meter-1/#
topic read cmnd/meter-1/#
# max-message 64K

# device cam-2, preset default
user cam-2
topic write /sensor/cam-2/#
topic write /device/cam-2/status
";

    #[test]
    fn device_accounts_are_the_blocks_after_a_device_line() {
        let accounts = parse(ACL).expect("parsed");
        assert_eq!(accounts.len(), 2);
        assert_eq!(accounts[0].name, "meter-1");
        assert_eq!(accounts[0].filters, ["tele/meter-1/#", "stat/meter-1/#"]);
        assert_eq!(accounts[0].max_message, Some(64 << 10));
        assert_eq!(accounts[1].max_message, None);
        assert!(parse("user a\n# max-message 1K\n").is_err());
        assert!(parse("# device a, preset default\nuser a\n# max-message lots\n").is_err());
        assert!(parse("something else\n").is_err());
    }

    #[test]
    fn filters_match_as_mqtt_does() {
        assert!(matches("tele/meter-1/#", "tele/meter-1"));
        assert!(matches("tele/meter-1/#", "tele/meter-1/SENSOR"));
        assert!(!matches("tele/meter-1/#", "tele/meter-10/SENSOR"));
        assert!(matches("spBv1.0/+/NDATA/n", "spBv1.0/g/NDATA/n"));
        assert!(!matches("spBv1.0/+/NDATA/n", "spBv1.0/g/NDATA/n/d"));
        assert!(!matches("/device/x/status", "/device/x"));
    }

    #[test]
    fn an_account_past_its_share_or_limit_is_refused_and_the_others_go_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("acl");
        std::fs::write(&file, ACL).expect("write");
        let accounts = Accounts::new(Some(file.clone()), 256 << 10, 10_000);
        // The services' topics are held by the budget only.
        assert_eq!(accounts.admit("/sensor/t-1/temperature", 1 << 20), Ok(()));
        assert_eq!(
            accounts.admit("tele/meter-1/SENSOR", (64 << 10) + 1),
            Err(Refused::TooLarge)
        );
        assert_eq!(
            accounts.admit("/sensor/cam-2/image", 300 << 10),
            Err(Refused::TooLarge)
        );
        for _ in 0..4 {
            assert_eq!(accounts.admit("/sensor/cam-2/image", 2_000), Ok(()));
        }
        assert_eq!(
            accounts.admit("/sensor/cam-2/image", 2_000),
            Err(Refused::OverShare)
        );
        assert_eq!(accounts.admit("tele/meter-1/SENSOR", 2_000), Ok(()));
        // Forwarded, once: room in its share again.
        accounts.forwarding(7, "/sensor/cam-2/image", 2_000);
        accounts.forwarding(7, "/sensor/cam-2/image", 2_000);
        assert_eq!(accounts.admit("/sensor/cam-2/image", 2_000), Ok(()));
        assert_eq!(
            accounts.admit("/sensor/cam-2/image", 2_000),
            Err(Refused::OverShare)
        );
        // Unreadable: one unknown account for every topic (fail closed).
        std::fs::write(&file, "nonsense here\n").expect("write");
        accounts.lock().checked = None;
        assert_eq!(
            accounts.admit("/sensor/t-1/temperature", 300 << 10),
            Err(Refused::TooLarge)
        );
        // Without --accounts, every topic is a service's.
        let open = Accounts::new(None, 256 << 10, 10_000);
        assert_eq!(open.admit("tele/meter-1/SENSOR", 1 << 20), Ok(()));
    }

    #[test]
    fn a_relay_started_again_counts_its_backlog_against_the_shares() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("acl");
        std::fs::write(&file, ACL).expect("write");
        let (log, _) = Log::open(&dir.path().join("log")).expect("open");
        let entry = |topic: &str| crate::log::Entry {
            topic: topic.to_owned(),
            payload: vec![b'x'; 2_000].into(),
            qos: rumqttc::QoS::AtLeastOnce,
            retain: false,
            received_ms: 0,
            edge_pkid: 1,
        };
        // Five of cam-2's, one forwarded already; one of a service's.
        let batch: Vec<_> = (0..5).map(|_| entry("/sensor/cam-2/image")).collect();
        log.append(&batch).expect("append");
        log.append(&[entry("/sensor/t-1/temperature")])
            .expect("append");
        log.mark_forwarded(2).expect("mark");

        let accounts = Accounts::new(Some(file), 256 << 10, 10_000);
        let cost = cost("/sensor/cam-2/image".len(), 2_000);
        assert_eq!(accounts.count_backlog(&log).expect("count"), (4, 4 * cost));
        assert_eq!(
            accounts.admit("/sensor/cam-2/image", 2_000),
            Err(Refused::OverShare),
            "its share is full of what the run before took"
        );
        assert_eq!(accounts.admit("tele/meter-1/SENSOR", 2_000), Ok(()));
        // The forwarder reads the first of them: room for one.
        accounts.forwarding(2, "/sensor/cam-2/image", 2_000);
        assert_eq!(accounts.admit("/sensor/cam-2/image", 2_000), Ok(()));
    }
}
