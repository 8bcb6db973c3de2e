//! A device's replay buffer on disk (`--replay-dir`): what it sent survives a restart of
//! the sensor process, so readings of an earlier boot can still be asked for.
//!
//! Layout: `<dir>/<device>/<n>-<boot>-<first>.log`, segment files of one payload per
//! line, `n` counting segments across boots (the oldest is the lowest), `first` the
//! `seq` of the first line. A segment is only ever appended to, by the boot that made
//! it; a line cut short by a crash is not a reading. The device's files hold at least
//! its last `capacity` readings, all boots together, and at most two segments more (a
//! segment is an eighth of the capacity, 64 to 4096 lines): when a segment is started,
//! the oldest ones go while the rest still hold the capacity.
//!
//! Each reading is written (one `write`) when it is published, so a crash of the
//! process loses nothing kept; `sync` (every second) bounds what a power loss takes.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use iot_core::replay::{mark_replay, Ranges, MAX_PER_REQUEST};

use super::Answer;

/// One segment file.
#[derive(Debug)]
struct Segment {
    number: u64,
    boot: String,
    first: u64,
    /// Complete lines in it.
    lines: u64,
    path: PathBuf,
}

/// The segments of one device, oldest first, and the one being written.
#[derive(Debug)]
pub struct DiskLog {
    dir: PathBuf,
    boot: String,
    capacity: u64,
    segment_lines: u64,
    segments: VecDeque<Segment>,
    writing: Option<File>,
    /// Whether `writing` holds lines not yet synced (a quiet device costs no sync).
    unsynced: bool,
}

impl DiskLog {
    /// Opens (creating it) the folder of `device` under `root` for boot `boot`, and
    /// reads what earlier boots left there.
    pub fn open(root: &Path, device: &str, boot: &str, capacity: usize) -> anyhow::Result<Self> {
        let dir = root.join(file_name(device));
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the replay folder {}", dir.display()))?;
        let mut segments = Vec::new();
        for entry in fs::read_dir(&dir)
            .with_context(|| format!("cannot read the replay folder {}", dir.display()))?
        {
            let path = entry
                .with_context(|| format!("cannot read the replay folder {}", dir.display()))?
                .path();
            let Some((number, boot, first)) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(parse_name)
            else {
                continue;
            };
            let content =
                fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let lines = content.iter().filter(|byte| **byte == b'\n').count() as u64;
            segments.push(Segment {
                number,
                boot,
                first,
                lines,
                path,
            });
        }
        segments.sort_by_key(|segment| segment.number);
        let capacity = capacity as u64;
        Ok(Self {
            dir,
            boot: boot.to_string(),
            capacity,
            segment_lines: (capacity / 8).clamp(64, 4096),
            segments: segments.into(),
            writing: None,
            unsynced: false,
        })
    }

    /// Readings kept from earlier boots, and how many boots.
    pub fn earlier(&self) -> (u64, usize) {
        let earlier = self.segments.iter().filter(|s| s.boot != self.boot);
        let boots: std::collections::BTreeSet<&str> =
            earlier.clone().map(|s| s.boot.as_str()).collect();
        (earlier.map(|s| s.lines).sum(), boots.len())
    }

    /// Keeps reading `seq` of this boot (the next one), as published.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> anyhow::Result<()> {
        if self.capacity == 0 {
            return Ok(());
        }
        let full = self.segments.back().is_none_or(|last| {
            last.boot != self.boot || last.lines >= self.segment_lines || self.writing.is_none()
        });
        if full {
            self.start_segment(seq)?;
        }
        let segment = self.segments.back_mut().expect("a segment to write");
        let file = self.writing.as_mut().expect("an open segment");
        let mut line = Vec::with_capacity(payload.len() + 1);
        line.extend_from_slice(payload);
        line.push(b'\n');
        file.write_all(&line)
            .with_context(|| format!("cannot write {}", segment.path.display()))?;
        segment.lines += 1;
        self.unsynced = true;
        Ok(())
    }

    /// Makes what was written survive a power loss; nothing to do when nothing was
    /// written since the last time.
    pub fn sync(&mut self) -> anyhow::Result<()> {
        if let (Some(file), true) = (&self.writing, self.unsynced) {
            file.sync_data().context("cannot sync the replay file")?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// A new segment starting at `seq`, and the oldest ones removed while the others
    /// hold the capacity.
    fn start_segment(&mut self, seq: u64) -> anyhow::Result<()> {
        // The segment written so far is complete: on disk before the next one starts.
        self.sync()?;
        let number = self.segments.back().map_or(1, |last| last.number + 1);
        let path = self
            .dir
            .join(format!("{number:010}-{}-{seq}.log", self.boot));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        self.writing = Some(file);
        self.segments.push_back(Segment {
            number,
            boot: self.boot.clone(),
            first: seq,
            lines: 0,
            path,
        });
        loop {
            let kept: u64 = self.segments.iter().map(|s| s.lines).sum();
            let oldest = self.segments.front().map_or(0, |s| s.lines);
            if self.segments.len() < 2 || kept - oldest < self.capacity {
                return Ok(());
            }
            let oldest = self.segments.pop_front().expect("a segment");
            fs::remove_file(&oldest.path)
                .with_context(|| format!("cannot remove {}", oldest.path.display()))?;
        }
    }

    /// The answer to `request` from what is on disk (at most [`MAX_PER_REQUEST`]
    /// readings): what it has of the boot, and the rest of the asked ranges as gone.
    /// Meant for earlier boots; the boot running answers from memory.
    pub fn answer(&self, request: &Ranges) -> anyhow::Result<Answer> {
        let mut answer = Answer::default();
        let segments: Vec<&Segment> = self
            .segments
            .iter()
            .filter(|segment| segment.boot == request.boot && segment.lines > 0)
            .collect();
        for &(from, to) in &request.ranges {
            let mut next = from;
            for segment in &segments {
                let last = segment.first + segment.lines - 1;
                if last < next || segment.first > to {
                    continue;
                }
                if segment.first > next {
                    answer.gone.push((next, segment.first - 1));
                }
                let content = fs::read(&segment.path)
                    .with_context(|| format!("cannot read {}", segment.path.display()))?;
                let lines = content.split(|byte| *byte == b'\n');
                let wanted = next.max(segment.first)..=to.min(last);
                for (seq, line) in (segment.first..).zip(lines) {
                    if seq > *wanted.end() {
                        break;
                    }
                    if !wanted.contains(&seq) {
                        continue;
                    }
                    if answer.replays.len() as u64 == MAX_PER_REQUEST {
                        return Ok(answer);
                    }
                    if let Some(marked) = mark_replay(line) {
                        answer.replays.push(marked);
                    }
                }
                next = to.min(last).saturating_add(1);
                if next > to {
                    break;
                }
            }
            if next <= to {
                answer.gone.push((next, to));
            }
        }
        Ok(answer)
    }
}

/// A device id as a folder name: other bytes than letters, digits, `.`, `_` and `-`
/// as `%XX`, and no `.` or `..`.
fn file_name(device: &str) -> String {
    let mut name = String::with_capacity(device.len());
    for byte in device.bytes() {
        if byte.is_ascii_alphanumeric()
            || b"_-".contains(&byte)
            || (byte == b'.' && !name.is_empty())
        {
            name.push(byte as char);
        } else {
            name.push_str(&format!("%{byte:02X}"));
        }
    }
    name
}

/// `<n>-<boot>-<first>.log`.
fn parse_name(name: &str) -> Option<(u64, String, u64)> {
    let mut parts = name.strip_suffix(".log")?.splitn(3, '-');
    let number = parts.next()?.parse().ok()?;
    let boot = parts.next()?;
    let first = parts.next()?.parse().ok()?;
    (!boot.is_empty() && first > 0).then(|| (number, boot.to_string(), first))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::tests::{reading, replayed, request};

    #[test]
    fn an_earlier_boot_is_answered_from_disk_after_a_restart() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut first = DiskLog::open(root.path(), "temp-1", "bootA", 1000).expect("open");
        for seq in 1..=300 {
            first.append(seq, &reading(seq)).expect("append");
        }
        drop(first);

        // The process restarted: a new boot, the old one on disk.
        let second = DiskLog::open(root.path(), "temp-1", "bootB", 1000).expect("open");
        assert_eq!(second.earlier(), (300, 1));
        let answer = second
            .answer(&request("bootA", &[(2, 3), (299, 305)]))
            .expect("answer");
        assert_eq!(
            replayed(&answer),
            [2, 3, 299, 300].map(|seq| format!("{{\"seq\":{seq},\"replay\":true}}"))
        );
        assert_eq!(answer.gone, [(301, 305)]);
        // A boot it never had is gone entirely.
        let unknown = second.answer(&request("other", &[(1, 5)])).expect("answer");
        assert!(unknown.replays.is_empty());
        assert_eq!(unknown.gone, [(1, 5)]);
    }

    #[test]
    fn the_oldest_segments_go_when_the_capacity_is_reached() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = DiskLog::open(root.path(), "temp-2", "b", 200).expect("open");
        for seq in 1..=1000 {
            log.append(seq, &reading(seq)).expect("append");
        }
        let kept: u64 = log.segments.iter().map(|s| s.lines).sum();
        assert!((200..=200 + 2 * 64).contains(&kept), "{kept} kept");
        let answer = log.answer(&request("b", &[(1, 1000)])).expect("answer");
        let first_kept = 1001 - kept;
        assert_eq!(answer.gone, [(1, first_kept - 1)]);
        assert_eq!(answer.replays.len() as u64, kept);
        // The files are what is kept, nothing more.
        let files = fs::read_dir(root.path().join("temp-2"))
            .expect("dir")
            .count();
        assert_eq!(files, log.segments.len());
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_not_a_reading() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = DiskLog::open(root.path(), "temp-3", "a", 100).expect("open");
        for seq in 1..=5 {
            log.append(seq, &reading(seq)).expect("append");
        }
        let path = log.segments[0].path.clone();
        drop(log);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(b"{\"seq\":6").expect("write");
        let log = DiskLog::open(root.path(), "temp-3", "b", 100).expect("open");
        let answer = log.answer(&request("a", &[(5, 6)])).expect("answer");
        assert_eq!(replayed(&answer), ["{\"seq\":5,\"replay\":true}"]);
        assert_eq!(answer.gone, [(6, 6)]);
    }

    #[test]
    fn device_names_become_safe_folder_names() {
        assert_eq!(file_name("temp-0001"), "temp-0001");
        assert_eq!(file_name("../etc"), "%2E.%2Fetc");
        assert_eq!(file_name("a/b c"), "a%2Fb%20c");
        assert_eq!(
            parse_name("0000000003-k3x9q2-501.log"),
            Some((3, "k3x9q2".into(), 501))
        );
        assert_eq!(parse_name("notes.txt"), None);
    }
}
