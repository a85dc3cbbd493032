//! Bounded in-memory logs: the output of each service and the console of machined, kept as the
//! last N bytes and followable by any number of readers.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::broadcast;

/// A log that keeps at most `capacity` bytes of whole lines.
#[derive(Debug)]
pub struct LogBuffer {
    inner: Mutex<Inner>,
    follow: broadcast::Sender<Bytes>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    lines: VecDeque<Bytes>,
    bytes: usize,
    partial: Vec<u8>,
}

impl LogBuffer {
    /// A log keeping the last `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        let (follow, _) = broadcast::channel(1024);
        Self {
            inner: Mutex::new(Inner::default()),
            follow,
            capacity,
        }
    }

    /// Appends output; complete lines become visible, a trailing partial line waits.
    pub fn write(&self, data: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.partial.extend_from_slice(data);
        while let Some(pos) = inner.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = inner.partial.drain(..=pos).collect();
            self.push_line(&mut inner, Bytes::from(line));
        }
        // A runaway line without newline must not grow without bound either.
        if inner.partial.len() > self.capacity / 4 {
            let mut line = std::mem::take(&mut inner.partial);
            line.push(b'\n');
            self.push_line(&mut inner, Bytes::from(line));
        }
    }

    fn push_line(&self, inner: &mut Inner, line: Bytes) {
        inner.bytes += line.len();
        inner.lines.push_back(line.clone());
        while inner.bytes > self.capacity {
            match inner.lines.pop_front() {
                Some(old) => inner.bytes -= old.len(),
                None => break,
            }
        }
        let _ = self.follow.send(line);
    }

    /// The last `n` lines (all with `None`), and a receiver for what comes after them.
    pub fn tail(&self, n: Option<usize>) -> (Vec<Bytes>, broadcast::Receiver<Bytes>) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.follow.subscribe();
        let skip = n.map_or(0, |n| inner.lines.len().saturating_sub(n));
        (inner.lines.iter().skip(skip).cloned().collect(), rx)
    }

    /// Bytes held now.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::io::Write for &LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LogBuffer::write(self, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_whole_lines_within_capacity() {
        let log = LogBuffer::new(20);
        log.write(b"first line\nsecond line\nthi");
        log.write(b"rd\n");
        let (lines, _) = log.tail(None);
        assert_eq!(
            lines,
            vec![Bytes::from("second line\n"), Bytes::from("third\n")]
        );
        assert!(log.len() <= 20);
        let (last, _) = log.tail(Some(1));
        assert_eq!(last, vec![Bytes::from("third\n")]);
    }

    #[tokio::test]
    async fn followers_see_new_lines() {
        let log = LogBuffer::new(1024);
        let (_, mut rx) = log.tail(Some(0));
        log.write(b"hello\n");
        assert_eq!(rx.recv().await.unwrap(), Bytes::from("hello\n"));
    }

    #[test]
    fn runaway_line_is_bounded() {
        let log = LogBuffer::new(100);
        log.write(&[b'x'; 1000]);
        assert!(log.len() <= 100);
    }
}
