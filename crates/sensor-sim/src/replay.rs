//! What a simulated device keeps of the readings it sent, to publish them again when the
//! cloud side asks (the replay protocol of `iot_core::replay`): in memory for the boot
//! running, and with `--replay-dir` on disk too ([`disk`]), for earlier boots.

pub mod disk;

use std::collections::VecDeque;

use iot_core::replay::{mark_replay, Ranges, MAX_PER_REQUEST};

/// The readings to send again by default: ten minutes' worth at `per_second` readings
/// a second per device, at least 100 and at most 100 000 (about 17 MB: a JSON reading of
/// about 110 bytes is kept in serde_json's buffer of 128, plus its slot in the queue).
pub fn default_capacity(per_second: Option<f64>) -> usize {
    match per_second {
        Some(rate) => ((rate * 600.0).ceil() as usize).clamp(100, 100_000),
        None => 100_000,
    }
}

/// The last readings one device published in this boot: consecutive `seq` numbers, the
/// oldest dropped when full.
#[derive(Debug, Clone)]
pub struct ReplayBuffer {
    capacity: usize,
    /// `seq` of the first entry.
    first: u64,
    payloads: VecDeque<Vec<u8>>,
}

/// What a device does with a request.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    /// Readings to publish again, marked as replays.
    pub replays: Vec<Vec<u8>>,
    /// Asked ranges it no longer has.
    pub gone: Vec<(u64, u64)>,
}

impl ReplayBuffer {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            first: 1,
            payloads: VecDeque::new(),
        }
    }

    /// The most readings it keeps; 0 keeps none.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Keeps reading `seq` (the next one) as published.
    pub fn push(&mut self, seq: u64, payload: Vec<u8>) {
        if self.capacity == 0 {
            return;
        }
        if self.payloads.is_empty() {
            self.first = seq;
        }
        if self.payloads.len() == self.capacity {
            self.payloads.pop_front();
            self.first += 1;
        }
        self.payloads.push_back(payload);
    }

    /// The answer to `request` from a device in boot `boot` whose last `seq` is `last`:
    /// the readings it has (at most [`MAX_PER_REQUEST`]), and the asked ranges it has
    /// not (all of them for another boot). `seq` numbers after `last` do not exist yet
    /// and are neither.
    pub fn answer(&self, boot: &str, last: u64, request: &Ranges) -> Answer {
        let mut answer = Answer::default();
        if request.boot != boot {
            answer.gone = request.ranges.clone();
            return answer;
        }
        let kept_to = self.first + self.payloads.len() as u64; // exclusive
        for &(from, to) in &request.ranges {
            let to = to.min(last);
            if from > to {
                continue;
            }
            if from < self.first {
                answer.gone.push((from, to.min(self.first - 1)));
            }
            for seq in from.max(self.first)..=to.min(kept_to.saturating_sub(1)) {
                if answer.replays.len() as u64 == MAX_PER_REQUEST {
                    return answer;
                }
                let payload = &self.payloads[(seq - self.first) as usize];
                if let Some(marked) = mark_replay(payload) {
                    answer.replays.push(marked);
                }
            }
        }
        answer
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Also the helpers of the disk buffer's tests.
    use super::*;

    /// A stand-in payload of reading `seq`.
    pub(crate) fn reading(seq: u64) -> Vec<u8> {
        format!("{{\"seq\":{seq}}}").into_bytes()
    }

    /// The readings an answer sends again, as text.
    pub(crate) fn replayed(answer: &Answer) -> Vec<String> {
        answer
            .replays
            .iter()
            .map(|payload| String::from_utf8_lossy(payload).into_owned())
            .collect()
    }

    pub(crate) fn request(boot: &str, ranges: &[(u64, u64)]) -> Ranges {
        Ranges {
            boot: boot.into(),
            ranges: ranges.to_vec(),
        }
    }

    fn buffer(capacity: usize, up_to: u64) -> ReplayBuffer {
        let mut buffer = ReplayBuffer::new(capacity);
        for seq in 1..=up_to {
            buffer.push(seq, reading(seq));
        }
        buffer
    }

    #[test]
    fn what_it_keeps_is_sent_again_and_what_it_dropped_is_gone() {
        let buffer = buffer(5, 10); // keeps 6..=10
        let answer = buffer.answer("b", 10, &request("b", &[(3, 7), (9, 12)]));
        assert_eq!(
            replayed(&answer),
            [6, 7, 9, 10].map(|seq| format!("{{\"seq\":{seq},\"replay\":true}}"))
        );
        assert_eq!(answer.gone, [(3, 5)]);
        let other_boot = buffer.answer("b", 10, &request("a", &[(1, 2)]));
        assert_eq!(
            other_boot,
            Answer {
                replays: Vec::new(),
                gone: vec![(1, 2)]
            }
        );
    }

    #[test]
    fn a_huge_request_is_bounded() {
        let buffer = buffer(20_000, 20_000);
        let answer = buffer.answer("b", 20_000, &request("b", &[(1, u64::MAX)]));
        assert_eq!(answer.replays.len() as u64, MAX_PER_REQUEST);
        assert!(answer.gone.is_empty());
    }

    #[test]
    fn ten_minutes_by_default_within_bounds() {
        assert_eq!(default_capacity(Some(2.0)), 1200);
        assert_eq!(default_capacity(Some(0.01)), 100);
        assert_eq!(default_capacity(Some(1e6)), 100_000);
        assert_eq!(default_capacity(None), 100_000);
    }
}
