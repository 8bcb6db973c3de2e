//! The edge relay's log candidates on one workload: messages of a reading's size
//! appended in batches, each batch made durable before it counts (group commit), then
//! the forwarded ones deleted; and a writer SIGKILLed mid-stream, the store reopened.
//!
//!   log-store write STORE DIR N BATCH     appends N, prints one line of figures
//!   log-store crash STORE DIR N BATCH     a child appends, is SIGKILLed half way;
//!                                         reopens, prints what survived
//!   log-store child STORE DIR N BATCH     (the crash run's writer: a line per commit)
//!
//! STORE: redb, fjall, sqlite, or file (a plain append-only file with fsync: the floor
//! the others are measured against).

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

/// A message as the relay keeps it: topic, payload, flags (about a JSON reading).
fn message(seq: u64) -> Vec<u8> {
    format!(
        "/sensor/temp-{:04}/temperature\u{0}{{\"device\":\"temp-{:04}\",\"boot\":\"k3x9q2\",\"seq\":{seq},\"ts\":\"2026-12-02T10:00:00.123Z\",\"value\":23.41,\"unit\":\"°C\"}}\u{0}1",
        seq % 100,
        seq % 100
    )
    .into_bytes()
}

trait Log {
    /// Appends `batch` durably: on disk when it returns.
    fn append(&mut self, first: u64, batch: &[Vec<u8>]);
    /// Deletes the entries below `below` (forwarded and past retention).
    fn delete_below(&mut self, below: u64);
    /// How many entries it holds, and the highest key.
    fn count(&mut self) -> (u64, u64);
}

struct Redb(redb::Database);
const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");
impl Log for Redb {
    fn append(&mut self, first: u64, batch: &[Vec<u8>]) {
        let txn = self.0.begin_write().expect("begin");
        {
            let mut table = txn.open_table(TABLE).expect("table");
            for (i, m) in batch.iter().enumerate() {
                table
                    .insert(first + i as u64, m.as_slice())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    fn delete_below(&mut self, below: u64) {
        let txn = self.0.begin_write().expect("begin");
        {
            let mut table = txn.open_table(TABLE).expect("table");
            table.retain_in(0..below, |_, _| false).expect("delete");
        }
        txn.commit().expect("commit");
    }
    fn count(&mut self) -> (u64, u64) {
        use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
        let txn = self.0.begin_read().expect("read");
        let Ok(table) = txn.open_table(TABLE) else {
            return (0, 0);
        };
        let last = table.last().expect("last").map_or(0, |(k, _)| k.value());
        (table.len().expect("len"), last)
    }
}

struct Fjall(fjall::Database, fjall::Keyspace);
impl Log for Fjall {
    fn append(&mut self, first: u64, batch: &[Vec<u8>]) {
        let mut b = self.0.batch();
        for (i, m) in batch.iter().enumerate() {
            b.insert(&self.1, (first + i as u64).to_be_bytes(), m.as_slice());
        }
        b.commit().expect("commit");
        self.0
            .persist(fjall::PersistMode::SyncAll)
            .expect("persist");
    }
    fn delete_below(&mut self, below: u64) {
        let mut b = self.0.batch();
        for key in 0..below {
            b.remove(&self.1, key.to_be_bytes());
        }
        b.commit().expect("commit");
        self.0
            .persist(fjall::PersistMode::SyncAll)
            .expect("persist");
    }
    fn count(&mut self) -> (u64, u64) {
        let mut n = 0;
        let mut last = 0;
        for kv in self.1.iter() {
            let key = kv.key().expect("key");
            n += 1;
            last = u64::from_be_bytes(key.as_ref().try_into().expect("8 bytes"));
        }
        (n, last)
    }
}

struct Sqlite(rusqlite::Connection);
impl Log for Sqlite {
    fn append(&mut self, first: u64, batch: &[Vec<u8>]) {
        let txn = self.0.transaction().expect("begin");
        {
            let mut insert = txn
                .prepare_cached("INSERT INTO log (seq, message) VALUES (?1, ?2)")
                .expect("prepare");
            for (i, m) in batch.iter().enumerate() {
                insert
                    .execute(rusqlite::params![(first + i as u64) as i64, m])
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    fn delete_below(&mut self, below: u64) {
        self.0
            .execute("DELETE FROM log WHERE seq < ?1", [below as i64])
            .expect("delete");
    }
    fn count(&mut self) -> (u64, u64) {
        self.0
            .query_row(
                "SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM log",
                [],
                |row| Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64)),
            )
            .expect("count")
    }
}

struct File(std::fs::File, std::path::PathBuf);
impl Log for File {
    fn append(&mut self, first: u64, batch: &[Vec<u8>]) {
        let mut buffer = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            buffer.extend_from_slice(&(first + i as u64).to_le_bytes());
            buffer.extend_from_slice(&(m.len() as u32).to_le_bytes());
            buffer.extend_from_slice(m);
        }
        self.0.write_all(&buffer).expect("write");
        self.0.sync_data().expect("sync");
    }
    fn delete_below(&mut self, _below: u64) {}
    fn count(&mut self) -> (u64, u64) {
        let data = std::fs::read(&self.1).expect("read");
        let (mut at, mut n, mut last) = (0, 0, 0);
        while at + 12 <= data.len() {
            let len = u32::from_le_bytes(data[at + 8..at + 12].try_into().expect("4")) as usize;
            if at + 12 + len > data.len() {
                break; // a record cut short by the crash
            }
            last = u64::from_le_bytes(data[at..at + 8].try_into().expect("8"));
            n += 1;
            at += 12 + len;
        }
        (n, last)
    }
}

fn open(store: &str, dir: &Path) -> Box<dyn Log> {
    std::fs::create_dir_all(dir).expect("dir");
    match store {
        "redb" => Box::new(Redb(
            redb::Database::create(dir.join("log.redb")).expect("redb"),
        )),
        "fjall" => {
            let db = fjall::Database::builder(dir).open().expect("fjall");
            let ks = db
                .keyspace("log", fjall::KeyspaceCreateOptions::default)
                .expect("keyspace");
            Box::new(Fjall(db, ks))
        }
        "sqlite" => {
            let c = rusqlite::Connection::open(dir.join("log.sqlite")).expect("sqlite");
            c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, message BLOB NOT NULL);").expect("schema");
            Box::new(Sqlite(c))
        }
        "file" => {
            let path = dir.join("log.bin");
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("file");
            Box::new(File(f, path))
        }
        other => panic!("no store {other}"),
    }
}

fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines().find_map(|l| {
                l.strip_prefix("write_bytes: ")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = entry.metadata().expect("meta");
        total += if meta.is_dir() {
            disk_usage(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// Appends messages 1..=n in batches of `batch`, telling `committed` the count after
/// each durable commit.
fn append_all(log: &mut dyn Log, n: u64, batch: u64, mut committed: impl FnMut(u64)) {
    let mut seq = 1;
    while seq <= n {
        let size = batch.min(n - seq + 1);
        let messages: Vec<Vec<u8>> = (seq..seq + size).map(message).collect();
        log.append(seq, &messages);
        seq += size;
        committed(seq - 1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, store, dir) = (&args[1], &args[2], Path::new(&args[3]));
    let n: u64 = args[4].parse().expect("N");
    let batch: u64 = args[5].parse().expect("BATCH");
    match mode.as_str() {
        "write" => {
            let mut log = open(store, dir);
            let (bytes0, started) = (write_bytes(), Instant::now());
            append_all(log.as_mut(), n, batch, |_| {});
            let elapsed = started.elapsed().as_secs_f64();
            let written = write_bytes() - bytes0;
            let on_disk = disk_usage(dir);
            let deleting = Instant::now();
            log.delete_below(n / 2 + 1);
            let delete_s = deleting.elapsed().as_secs_f64();
            let (left, _) = log.count();
            let payload: u64 = (1..=n).map(|s| message(s).len() as u64).sum();
            println!(
                "{store} n={n} batch={batch} seconds={elapsed:.3} per_second={:.0} commits_per_second={:.0} written_per_message={:.0} payload_per_message={:.0} on_disk_per_message={:.0} delete_half_seconds={delete_s:.3} left={left}",
                n as f64 / elapsed,
                (n as f64 / batch as f64) / elapsed,
                written as f64 / n as f64,
                payload as f64 / n as f64,
                on_disk as f64 / n as f64,
            );
        }
        "child" => {
            let mut log = open(store, dir);
            let mut out = std::io::stdout().lock();
            append_all(log.as_mut(), n, batch, |committed| {
                writeln!(out, "{committed}").expect("stdout");
                out.flush().expect("flush");
            });
        }
        "crash" => {
            let mut child = std::process::Command::new(&args[0])
                .args(["child", store, &args[3], &args[4], &args[5]])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("child");
            let lines = std::io::BufReader::new(child.stdout.take().expect("stdout"));
            let mut acknowledged = 0;
            for line in lines.lines() {
                acknowledged = line.expect("line").parse().expect("a count");
                if acknowledged >= n / 2 {
                    break;
                }
            }
            child.kill().expect("SIGKILL");
            child.wait().expect("wait");
            let opening = Instant::now();
            let mut log = open(store, dir);
            let open_s = opening.elapsed().as_secs_f64();
            let (count, last) = log.count();
            println!(
                "{store} crash: acknowledged={acknowledged} recovered={count} last={last} lost={} reopen_seconds={open_s:.3}",
                acknowledged.saturating_sub(count.min(last))
            );
        }
        other => panic!("no mode {other}"),
    }
}
