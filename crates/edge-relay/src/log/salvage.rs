//! What a damaged store still holds, read without fjall: the journal's intact batches
//! (fjall refuses a whole journal for one damaged batch), and a keyspace's `current`
//! file written again from its newest version file (fjall takes a keyspace folder
//! without it for a half-made keyspace and deletes it, tables and all).
//!
//! Both follow fjall 3's on-disk formats (`fjall::journal::entry`, `lsm_tree::version`);
//! `log::tests` checks them against fjall's own files.

use std::hash::Hasher;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// One write of a journal: `(keyspace id, key, value)`, a value of `None` a deletion.
pub type Item = (u64, Vec<u8>, Option<Vec<u8>>);

/// What a journal file holds.
#[derive(Debug, Default)]
pub struct Journal {
    /// Its intact batches' writes, in order (when asked for).
    pub items: Vec<Item>,
    /// Writes of the batches that failed their checksum (what they say, unverified).
    pub damaged: Vec<Item>,
    /// Batches that failed their checksum.
    pub damaged_batches: u64,
    /// Bytes of whole batches (their end written) that could not be parsed (a damaged
    /// length or tag).
    pub unparsed: u64,
    /// Bytes at the end with no batch's end after them: a write cut short by a crash,
    /// which fjall's recovery cuts off (no damage: the relay acknowledges a batch only
    /// once it is on disk whole).
    pub torn: u64,
}

impl Journal {
    /// Whether it is damaged before its end: fjall would refuse it, or cut off intact
    /// batches after the damage without a word.
    pub fn is_damaged(&self) -> bool {
        self.damaged_batches > 0 || self.unparsed > 0
    }
}

/// The journal files of `store`, oldest first.
pub fn journal_files(store: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(store).with_context(|| format!("{}", store.display()))? {
        let path = entry?.path();
        let id = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".jnl"))
            .and_then(|id| id.parse().ok());
        if let Some(id) = id {
            files.push((id, path));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, path)| path).collect())
}

const START: u8 = 1;
const ITEM: u8 = 2;
const END: u8 = 3;
const CLEAR: u8 = 4;
const MAGIC: &[u8] = b"FJL\x03";

/// Reads a journal file: `START count seqno`, items (`ITEM type compression keyspace
/// key-length value-length stored-length key value`, little-endian), `END checksum
/// MAGIC`, the checksum an xxh3 of the items' bytes. Past a part that cannot be
/// parsed, reading goes on after the next batch's end.
pub fn read_journal(path: &Path, keep_items: bool) -> anyhow::Result<Journal> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut journal = Journal::default();
    let mut at = 0;
    // Unparsed bytes not followed by an intact batch (yet).
    let mut pending = 0;
    while at < bytes.len() {
        // The file is made longer at once, with zeros: its end.
        if bytes[at] == 0 && bytes[at..].iter().all(|byte| *byte == 0) {
            break;
        }
        match batch(&bytes, at) {
            Some((end, items, intact)) => {
                if intact {
                    journal.unparsed += pending;
                    pending = 0;
                    if keep_items {
                        journal.items.extend(items);
                    }
                } else {
                    journal.damaged_batches += 1;
                    journal.damaged.extend(items);
                }
                at = end;
            }
            None => {
                // To the end of the next batch: its start is the next thing written.
                let end = bytes[at + 1..]
                    .windows(MAGIC.len())
                    .position(|window| window == MAGIC)
                    .map(|found| at + 1 + found + MAGIC.len());
                match end {
                    // A batch's end written after it: a whole write that cannot be
                    // parsed is damage, even the last one (fjall would cut it off as
                    // torn, and with it messages acknowledged long before).
                    Some(next) => {
                        journal.unparsed += pending + (next - at) as u64;
                        pending = 0;
                        at = next;
                    }
                    // No end after it: a write a crash cut short, never acknowledged.
                    None => {
                        pending += (bytes.len() - at) as u64;
                        at = bytes.len();
                    }
                }
            }
        }
    }
    journal.torn = pending;
    Ok(journal)
}

/// Longer than any value the log writes: a message (at most 2 MiB as the brokers count
/// it) with its topic and header.
const MAX_VALUE: usize = 4 << 20;

/// The batch at `at`: where it ends, its writes, whether its checksum holds.
fn batch(bytes: &[u8], mut at: usize) -> Option<(usize, Vec<Item>, bool)> {
    fn take<'a>(bytes: &'a [u8], at: &mut usize, n: usize) -> Option<&'a [u8]> {
        let slice = bytes.get(*at..at.checked_add(n)?)?;
        *at += n;
        Some(slice)
    }
    let take = |at: &mut usize, n: usize| take(bytes, at, n);
    let u32_at = |slice: &[u8]| u32::from_le_bytes(slice.try_into().unwrap_or_default());
    let u64_at = |slice: &[u8]| u64::from_le_bytes(slice.try_into().unwrap_or_default());
    if take(&mut at, 1)? != [START] {
        return None;
    }
    let count = u32_at(take(&mut at, 4)?);
    take(&mut at, 8)?; // seqno
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut items = Vec::new();
    for _ in 0..count {
        let begin = at;
        match take(&mut at, 1)?[0] {
            ITEM => {
                let head = take(&mut at, 2 + 8 + 2 + 4 + 4)?;
                let (kind, compression) = (head[0], head[1]);
                let keyspace = u64_at(&head[2..10]);
                let key_length = usize::from(u16::from_le_bytes([head[10], head[11]]));
                let value_length = u32_at(&head[12..16]) as usize;
                let stored_length = u32_at(&head[16..20]) as usize;
                // No value of the log is longer (a message is at most 2 MiB): a length
                // past it is damage, not an allocation of up to 4 GiB to decompress.
                if value_length > MAX_VALUE {
                    return None;
                }
                let key = take(&mut at, key_length)?.to_vec();
                let stored = take(&mut at, stored_length)?;
                // A damaged compressed value: the batch fails its checksum below.
                let value = match compression {
                    0 => stored.to_vec(),
                    1 => lz4_flex::decompress(stored, value_length).unwrap_or_default(),
                    _ => return None,
                };
                let value = match kind {
                    0 => Some(value),
                    1 | 2 => None,
                    _ => return None,
                };
                items.push((keyspace, key, value));
            }
            CLEAR => {
                take(&mut at, 8)?;
            }
            _ => return None,
        }
        hasher.update(&bytes[begin..at]);
    }
    if take(&mut at, 1)? != [END] {
        return None;
    }
    let checksum = u64_at(take(&mut at, 8)?);
    if take(&mut at, MAGIC.len())? != MAGIC {
        return None;
    }
    Some((at, items, hasher.finish() == checksum))
}

/// Writes again the `current` file of each keyspace folder of `store` that lacks one
/// (or has one too short to name a version), from the folder's newest version file;
/// says what it did. An error: a folder without any version file to name.
pub fn restore_current_files(store: &Path) -> anyhow::Result<Vec<String>> {
    let mut said = Vec::new();
    let keyspaces = store.join("keyspaces");
    let Ok(folders) = std::fs::read_dir(&keyspaces) else {
        return Ok(said);
    };
    for folder in folders {
        let folder = folder?.path();
        if !folder.is_dir() {
            continue;
        }
        let current = folder.join("current");
        let missing = !current.exists();
        let length = std::fs::metadata(&current).map_or(0, |metadata| metadata.len());
        if length >= 8 {
            continue;
        }
        let newest = std::fs::read_dir(&folder)?
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let id: u64 = path
                    .file_name()?
                    .to_str()?
                    .strip_prefix('v')?
                    .parse()
                    .ok()?;
                let bytes = std::fs::read(&path)
                    .ok()
                    .filter(|bytes| !bytes.is_empty())?;
                Some((id, bytes))
            })
            .max_by_key(|(id, _)| *id);
        let Some((id, version)) = newest else {
            anyhow::bail!(
                "{} has neither a current file nor a version file to make one from",
                folder.display()
            );
        };
        let mut content = Vec::with_capacity(25);
        content.extend_from_slice(&id.to_le_bytes());
        content.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(&version).to_le_bytes());
        content.push(0); // xxh3
        std::fs::write(&current, content)
            .with_context(|| format!("cannot write {}", current.display()))?;
        said.push(format!(
            "{} was {}: written again from version file v{id}",
            current.display(),
            if missing { "missing" } else { "damaged" }
        ));
    }
    Ok(said)
}
