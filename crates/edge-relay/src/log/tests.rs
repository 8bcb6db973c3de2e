//! The log on a real disk: what survives a reopen, what the index finds, what trimming
//! removes, and a damaged store.

use super::*;

fn entry(topic: &str, payload: &str) -> Entry {
    Entry {
        topic: topic.to_string(),
        payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        received_ms: 1_700_000_000_000,
        edge_pkid: 7,
    }
}

fn reading(device: &str, seq: u64) -> Entry {
    entry(
        &format!("/sensor/{device}/temperature"),
        &format!(r#"{{"device":"{device}","boot":"b1","seq":{seq},"value":21.5}}"#),
    )
}

#[test]
fn an_entry_reads_back_as_written() {
    let mut retained = entry("/sensor/temperature", "23.41");
    retained.retain = true;
    retained.qos = QoS::AtMostOnce;
    for entry in [retained, reading("t-1", 7), entry("a/b", "")] {
        assert_eq!(Entry::decode(&entry.encode()), Some(entry.clone()));
    }
    assert_eq!(Entry::decode(b""), None);
    assert_eq!(Entry::decode(&[9, 0, 0]), None);
    let mut wrong = reading("t-1", 7).encode();
    wrong[0] = 3;
    assert_eq!(Entry::decode(&wrong), None);
    // Format 1, as relays before the edge packet id wrote it: read, packet id 0.
    let mut old = reading("t-1", 7);
    let mut written = old.encode();
    written[0] = 1;
    written.drain(10..12);
    old.edge_pkid = 0;
    assert_eq!(Entry::decode(&written), Some(old));
}

#[test]
fn only_readings_within_bounds_are_keyed() {
    assert_eq!(
        reading("t-1", 7).reading_key(),
        Some(("t-1".into(), "b1".into(), 7))
    );
    for payload in [
        "23.41",
        r#"{"device":"t-1","seq":7,"value":1}"#,
        r#"{"device":"a/b","boot":"b1","seq":7,"value":1}"#,
        r#"{"device":"t-1","boot":"b1","seq":0,"value":1}"#,
        "{not json",
    ] {
        assert_eq!(entry("x", payload).reading_key(), None, "{payload}");
    }
    // Whose reading it is: the topic's device (the payload may leave it out, never name
    // another), or the payload's on the project's own sensors' topics, or nobody's.
    let key = |topic: &str, payload: &str| entry(topic, payload).reading_key();
    let t1 = Some(("t-1".to_string(), "b1".to_string(), 7));
    let claim = r#"{"device":"t-1","boot":"b1","seq":7,"value":1}"#;
    let anonymous = r#"{"boot":"b1","seq":7,"value":1}"#;
    assert_eq!(key("/sensor/t-1/temperature", anonymous), t1);
    assert_eq!(key("/sensor/t-1/a/b", claim), t1);
    assert_eq!(key("/sensor/temperature", claim), t1);
    assert_eq!(key("/sensor/pressure", claim), t1);
    for topic in [
        "/sensor/evil/temperature",
        "/sensor/t-1",
        "/sensor//x",
        "/plant/t-1/x",
        "x",
    ] {
        assert_eq!(key(topic, claim), None, "{topic}");
    }
    assert_eq!(key("/sensor/temperature", anonymous), None);
}

#[test]
fn what_was_appended_survives_a_reopen_with_its_forwarded_mark() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (log, opened) = Log::open(dir.path()).expect("open");
        assert_eq!((opened.messages, opened.backlog), (0, 0));
        log.append(&[reading("t-1", 1), reading("t-1", 2)])
            .expect("append");
        log.append(&[reading("t-1", 3)]).expect("append");
        assert_eq!(log.next(), 4);
        assert_eq!(log.backlog(), 3);
        log.mark_forwarded(3).expect("mark");
        log.sync().expect("sync");
    }
    let (log, opened) = Log::open(dir.path()).expect("reopen");
    assert_eq!((opened.messages, opened.backlog), (3, 1));
    assert_eq!(log.next(), 4);
    let unforwarded = log
        .read_from(log.forwarded(), 10, usize::MAX)
        .expect("read");
    assert_eq!(unforwarded, vec![(3, reading("t-1", 3))]);
}

#[test]
fn a_log_keeps_its_id_and_a_new_log_gets_another() {
    let dir = tempfile::tempdir().expect("temp dir");
    let id = {
        let (log, _) = Log::open(dir.path()).expect("open");
        log.append(&[reading("t-1", 1)]).expect("append");
        log.id().to_string()
    };
    assert_eq!(id.len(), 16, "{id}");
    let (log, _) = Log::open(dir.path()).expect("reopen");
    assert_eq!(log.id(), id);
    drop(log);
    // Moved aside, as damage does: the new log numbers from 1 again, under another id.
    std::fs::rename(dir.path().join("store"), dir.path().join("aside")).expect("move");
    let (log, _) = Log::open(dir.path()).expect("new log");
    assert_eq!(log.next(), 1);
    assert_ne!(log.id(), id);
}

#[test]
fn each_run_names_what_it_wrote_and_a_restored_copy_writes_under_a_new_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = tempfile::tempdir().expect("temp dir");
    let first = {
        let (log, _) = Log::open(dir.path()).expect("open");
        log.append(&[reading("t-1", 1), reading("t-1", 2)])
            .expect("append");
        log.sync().expect("sync");
        assert_eq!(log.run_of(1), log.run_of(2));
        assert_eq!(log.run_of(1).len(), 16);
        assert_ne!(log.run_of(1), log.id());
        log.run_of(1).to_string()
    };
    // A copy of the log as it is now, as a backup would take it.
    let status = std::process::Command::new("cp")
        .args(["-a", &dir.path().join("store").display().to_string()])
        .arg(copy.path().join("store"))
        .status()
        .expect("cp");
    assert!(status.success());
    let second = {
        let (log, _) = Log::open(dir.path()).expect("reopen");
        // What the first run wrote keeps its run; what this one writes gets its own.
        assert_eq!(log.run_of(2), first);
        log.append(&[reading("t-1", 3)]).expect("append");
        log.sync().expect("sync");
        assert_ne!(log.run_of(3), first);
        log.run_of(3).to_string()
    };
    let (log, _) = Log::open(dir.path()).expect("reopen");
    assert_eq!(
        (log.run_of(1), log.run_of(3)),
        (first.as_str(), second.as_str())
    );
    drop(log);
    // The copy restored: number 3 is given again, under another run than the one the
    // cloud already has it from.
    let (restored, _) = Log::open(copy.path()).expect("the copy");
    assert_eq!(restored.next(), 3);
    assert_eq!(restored.run_of(2), first);
    restored.append(&[reading("t-1", 4)]).expect("append");
    assert_ne!(restored.run_of(3), second);
    assert_ne!(restored.run_of(3), first);
}

#[test]
fn messages_of_a_relay_before_runs_keep_the_logs_id() {
    let dir = tempfile::tempdir().expect("temp dir");
    let id = {
        let (log, _) = Log::open(dir.path()).expect("open");
        log.append(&[reading("t-1", 1), reading("t-1", 2)])
            .expect("append");
        // As an older relay left it: no runs.
        let runs: Vec<_> = log
            .meta
            .prefix(RUN)
            .map(|guard| guard.into_inner().expect("a run").0)
            .collect();
        for key in runs {
            log.meta.remove(key).expect("remove");
        }
        log.sync().expect("sync");
        log.id().to_string()
    };
    let (log, _) = Log::open(dir.path()).expect("reopen");
    assert_eq!(log.run_of(1), id);
    assert_eq!(log.run_of(2), id);
    assert_ne!(log.run_of(3), id);
}

#[test]
fn the_index_finds_a_range_and_never_a_forgery() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = Log::open(dir.path()).expect("open");
    let batch: Vec<Entry> = (1..=10).map(|seq| reading("t-1", seq)).collect();
    log.append(&batch).expect("append");
    // Another account's topic, claiming t-1's readings 5 (which the log has) and 12
    // (which it has not: the request for it must go on to t-1).
    for seq in [5, 12] {
        log.append(&[entry(
            "/sensor/t-2/temperature",
            &format!(r#"{{"device":"t-1","boot":"b1","seq":{seq},"value":99}}"#),
        )])
        .expect("append");
    }
    let found = log.readings("t-1", "b1", (4, 6), 100).expect("lookup");
    assert_eq!(found, vec![(4, 4), (5, 5), (6, 6)]);
    assert_eq!(
        log.readings("t-1", "b1", (12, 12), 100).expect("lookup"),
        []
    );
    assert_eq!(log.readings("t-2", "b1", (1, 20), 100).expect("lookup"), []);
    assert_eq!(log.readings("t-1", "b2", (1, 10), 100).expect("lookup"), []);
    assert_eq!(
        log.readings("t-1", "b1", (1, 10), 3).expect("lookup").len(),
        3
    );
}

#[test]
fn trimming_removes_only_forwarded_messages_and_their_index() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = Log::open(dir.path()).expect("open");
    let batch: Vec<Entry> = (1..=10).map(|seq| reading("t-1", seq)).collect();
    log.append(&batch).expect("append");
    log.mark_forwarded(6).expect("mark");
    assert_eq!(log.trim(100, |_| true).expect("trim"), 5);
    assert_eq!(log.first(), 6);
    assert_eq!(
        log.readings("t-1", "b1", (1, 10), 100)
            .expect("lookup")
            .len(),
        5
    );
    assert_eq!(
        log.trim(100, |_| true).expect("trim"),
        0,
        "6 is not forwarded"
    );
    log.mark_forwarded(11).expect("mark");
    assert_eq!(log.trim(2, |_| true).expect("trim"), 2, "at most the limit");
    assert_eq!(
        log.trim(100, |_| false).expect("trim"),
        0,
        "kept while asked"
    );
    assert_eq!(log.read_from(0, 100, usize::MAX).expect("read").len(), 3);
}

#[test]
fn a_log_of_an_earlier_relay_gets_its_ages_indexed_once_and_trims() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (log, _) = Log::open(dir.path()).expect("open");
        let mut batch: Vec<Entry> = (1..=4).map(|seq| reading("t-1", seq)).collect();
        batch[3].received_ms += 60_000;
        log.append(&batch).expect("append");
        log.mark_forwarded(5).expect("mark");
        // As a relay before the index wrote it: no ages, no mark.
        for number in 1..=4u64 {
            log.ages.remove(number.to_be_bytes()).expect("remove");
        }
        log.meta.remove(AGES).expect("remove");
        log.sync().expect("sync");
    }
    let (log, _) = Log::open(dir.path()).expect("open again");
    assert_eq!(log.ages.len().expect("count"), 4, "indexed");
    assert_eq!(log.taken_at(2).expect("age"), Some((2, 1_700_000_000_000)));
    // The first three are older than the fourth: retention takes them and their index.
    let keep_from = 1_700_000_000_000 + 1;
    assert_eq!(
        log.trim(100, |received| received < keep_from)
            .expect("trim"),
        3
    );
    assert_eq!(log.first(), 4);
    let left = log.readings("t-1", "b1", (1, 10), 100).expect("lookup");
    assert_eq!(left, [(4, 4)]);
    // Deleting moves the first kept number on (no tombstones): ages below it are gone
    // with their tables.
    let ages_kept = log.ages.range(log.first().to_be_bytes()..).count();
    assert_eq!(ages_kept, 1);
}

#[test]
fn a_store_that_cannot_be_opened_is_set_aside_and_a_new_one_started() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (log, _) = Log::open(dir.path()).expect("open");
        log.append(&[reading("t-1", 1)]).expect("append");
    }
    // Every file of the store overwritten with garbage.
    for file in walk(&dir.path().join("store")) {
        std::fs::write(&file, b"not a store").expect("overwrite");
    }
    let (log, opened) = Log::open(dir.path()).expect("open a new store");
    let (aside, why) = opened.set_aside.expect("the damaged store set aside");
    assert!(aside.starts_with(dir.path()) && aside.exists(), "{aside:?}");
    assert!(!why.is_empty());
    assert_eq!((opened.messages, log.next()), (0, 1));
    log.append(&[reading("t-1", 2)])
        .expect("the new store takes messages");
}

/// A log in `dir` with 20 writes of one reading each, closed: its largest journal.
fn twenty_writes(dir: &std::path::Path) -> std::path::PathBuf {
    {
        let (log, _) = Log::open(dir).expect("open");
        for seq in 1..=20 {
            log.append(&[reading("t-1", seq)]).expect("append");
        }
    }
    walk(&dir.join("store"))
        .into_iter()
        .filter(|path| path.extension().is_some_and(|ext| ext == "jnl"))
        .max_by_key(|path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
        .expect("a journal file")
}

#[test]
fn a_torn_last_write_is_cut_off_and_the_rest_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Half of the last journal's last write cut off, as a power cut mid-write leaves it.
    let journal = twenty_writes(dir.path());
    let length = std::fs::metadata(&journal).expect("journal").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .expect("journal");
    file.set_len(length - 40).expect("truncate");
    let (log, opened) = Log::open(dir.path()).expect("reopen");
    assert!(opened.set_aside.is_none(), "recovered in place");
    // The last write is lost unless the store had flushed it into a table on close.
    assert!(
        (19..=20).contains(&opened.messages),
        "{} kept",
        opened.messages
    );
    assert_eq!(log.next(), opened.messages + 1);
    assert_eq!(
        log.read_from(1, 100, usize::MAX).expect("read").len() as u64,
        opened.messages
    );
}

/// The last write of the journal whole (its end written) but damaged where a length or
/// tag is: damage, said and set aside, not a write a crash tore (which fjall cuts off
/// without a word, and with it messages acknowledged long before).
#[test]
fn a_damaged_last_write_is_not_taken_for_a_torn_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let journal = twenty_writes(dir.path());
    let mut bytes = std::fs::read(&journal).expect("journal");
    // The last write begins after the end of the one before it: its first item's tag
    // after the batch's start (1 byte), count (4) and sequence number (8).
    let magic = b"FJL\x03";
    let ends: Vec<usize> = bytes
        .windows(magic.len())
        .enumerate()
        .filter(|(_, window)| *window == magic)
        .map(|(at, _)| at + magic.len())
        .collect();
    let last_start = ends[ends.len() - 2];
    bytes[last_start + 13] = 0xff;
    std::fs::write(&journal, bytes).expect("damaged");
    let read = super::salvage::read_journal(&journal, false).expect("read");
    assert!(read.is_damaged(), "{read:?}");
    let (log, opened) = Log::open(dir.path()).expect("reopen");
    assert!(
        opened
            .damage
            .iter()
            .any(|said| said.contains("could not be parsed")),
        "no word of the damage: {opened:?}"
    );
    // The writes before the damaged one are all there (the journal's intact batches
    // written again); the damaged one is lost, and said to be.
    assert!(log.next() >= 20, "{} kept", opened.messages);
}

/// A block of the message table damaged while the relay runs (found on reading, not on
/// opening): reads go past it, it is noted once, and what it held is counted.
#[test]
fn a_block_damaged_while_running_is_skipped_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let payload = "x".repeat(3000);
    {
        let (log, _) = Log::open(dir.path()).expect("open");
        for batch in 0..30 {
            let entries: Vec<Entry> = (0..100)
                .map(|n| entry(&format!("/sensor/b/{}", batch * 100 + n), &payload))
                .collect();
            log.append(&entries).expect("append");
        }
        log.compact().expect("into a table");
    }
    let table = walk(&dir.path().join("store"))
        .into_iter()
        .filter(|path| {
            path.parent()
                .is_some_and(|parent| parent.ends_with("tables"))
        })
        .max_by_key(|path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
        .expect("a table");
    let mut bytes = std::fs::read(&table).expect("table");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&table, bytes).expect("damaged");

    // As if the damage came after the start: the store's own scan forgotten.
    let log = Log::open_store(&dir.path().join("store")).expect("open");
    let found = std::mem::take(&mut *log.unreadable.lock().expect("lock"));
    let [(from, to)] = found[..] else {
        panic!("one damaged stretch: {found:?}");
    };
    let mut numbers = Vec::new();
    let mut at = 1;
    loop {
        let read = log.read_from(at, 256, usize::MAX).expect("read");
        let Some(&(last, _)) = read.last() else {
            break;
        };
        numbers.extend(read.iter().map(|(number, _)| *number));
        at = last + 1;
    }
    assert_eq!(numbers.len() as u64, 3000 - (to - from), "{from}..{to}");
    assert!(numbers.iter().all(|number| !(from..to).contains(number)));
    assert_eq!(*log.unreadable.lock().expect("lock"), vec![(from, to)]);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn deleted_messages_stay_deleted_across_a_restart_and_their_tables_go() {
    let dir = tempfile::tempdir().expect("temp dir");
    let payload = "x".repeat(3000);
    {
        let (log, _) = Log::open(dir.path()).expect("open");
        for batch in 0..10 {
            let entries: Vec<Entry> = (0..100)
                .map(|n| entry(&format!("/sensor/b/{}", batch * 100 + n), &payload))
                .collect();
            log.append(&entries).expect("append");
            // A table per batch.
            log.messages.rotate_memtable_and_wait().expect("flush");
        }
        log.mark_forwarded(1001).expect("mark");
        let before = log.table_bytes();
        assert_eq!(log.trim(550, |_| true).expect("trim"), 550);
        log.release(false).expect("release");
        assert!(
            log.table_bytes() < before * 6 / 10,
            "the tables below the first kept number dropped: {} of {before}",
            log.table_bytes()
        );
        assert_eq!(log.read_from(0, 10, usize::MAX).expect("read")[0].0, 551);
        log.sync().expect("sync");
    }
    let (log, opened) = Log::open(dir.path()).expect("open again");
    assert_eq!(
        (log.first(), opened.messages, opened.backlog),
        (551, 450, 0)
    );
    assert_eq!(log.read_from(0, 10, usize::MAX).expect("read")[0].0, 551);
}

fn with_pkid(pkid: u16, payload: &str) -> Entry {
    Entry {
        edge_pkid: pkid,
        ..entry("/sensor/plain-1/temperature", payload)
    }
}

#[test]
fn the_edge_packet_ids_survive_a_reopen_and_a_copy_into_a_new_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let print = |payload: &str| fingerprint(b"/sensor/plain-1/temperature", payload.as_bytes());
    {
        let (log, _) = Log::open(dir.path()).expect("open");
        assert_eq!(
            log.edge_pkids(),
            Some(EdgePkids::default()),
            "a new log's map is whole"
        );
        let qos0 = Entry {
            qos: QoS::AtMostOnce,
            ..with_pkid(3, "qos 0")
        };
        log.append(&[with_pkid(1, "a"), with_pkid(2, "b"), qos0])
            .expect("append");
        log.append(&[with_pkid(1, "c")]).expect("append");
    }
    let (log, _) = Log::open(dir.path()).expect("open again");
    let known = Some(EdgePkids {
        last: Some(1),
        known: vec![(1, print("c")), (2, print("b"))],
    });
    assert_eq!(log.edge_pkids(), known);

    let fresh = Log::open_store(&dir.path().join("copy")).expect("a new store");
    log.copy_into(&fresh, &[]).expect("copy");
    assert_eq!(fresh.edge_pkids(), known);

    // The edge broker lost the session: none of them names a message any more.
    log.new_edge_session().expect("new session");
    log.append(&[with_pkid(2, "d")]).expect("append");
    drop((log, fresh));
    let (log, _) = Log::open(dir.path()).expect("open again");
    let known = EdgePkids {
        last: Some(2),
        known: vec![(2, print("d"))],
    };
    assert_eq!(log.edge_pkids(), Some(known));
}

#[test]
fn a_log_of_an_earlier_relay_has_no_packet_id_map_until_one_is_saved() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (log, _) = Log::open(dir.path()).expect("open");
        log.append(&[with_pkid(1, "a")]).expect("append");
        // As a relay before the map wrote it.
        log.meta.remove(edge_pkid_key(1)).expect("remove");
        log.meta.remove(EDGE_PKIDS).expect("remove");
        log.sync().expect("sync");
    }
    let (log, _) = Log::open(dir.path()).expect("open again");
    assert_eq!(log.edge_pkids(), None);
    let fresh = Log::open_store(&dir.path().join("copy")).expect("a new store");
    log.copy_into(&fresh, &[]).expect("copy");
    assert_eq!(fresh.edge_pkids(), None, "not whole in the copy either");
    let known = EdgePkids {
        last: Some(1),
        known: vec![(1, 42)],
    };
    log.save_edge_pkids(&known).expect("save");
    assert_eq!(log.edge_pkids(), Some(known));
}
