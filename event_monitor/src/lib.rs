//! The JSON event stream: what happened to the VMM, the VM and its integrity.
//!
//! Events are written as Cloud Hypervisor writes them: one pretty-printed JSON
//! object per event, separated by a blank line:
//! `{"timestamp":{"secs":..,"nanos":..},"source":..,"event":..,"properties":{..}|null}`,
//! the timestamp being the time since the monitor started. `emit` never blocks:
//! events go through a bounded queue to a writer thread, and any the queue
//! cannot take are counted and reported in the next event written.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

/// How many events may wait for the writer before new ones are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 4096;

#[derive(Serialize)]
struct Timestamp {
    secs: u64,
    nanos: u32,
}

#[derive(Serialize)]
struct Event {
    timestamp: Timestamp,
    source: String,
    event: String,
    properties: Option<Map<String, Value>>,
}

enum Message {
    Event(Event),
    /// Acknowledged once everything queued before it is written.
    Flush(SyncSender<()>),
}

struct Monitor {
    start: Instant,
    queue: Mutex<SyncSender<Message>>,
    dropped: AtomicU64,
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();

/// Starts writing events to `out`. Only the first call takes effect.
pub fn set_monitor(out: Box<dyn Write + Send>) -> bool {
    let (tx, rx) = sync_channel(QUEUE_CAPACITY);
    let monitor = Monitor { start: Instant::now(), queue: Mutex::new(tx), dropped: AtomicU64::new(0) };
    if MONITOR.set(monitor).is_err() {
        return false;
    }
    std::thread::Builder::new().name("event-monitor".into()).spawn(move || write_events(rx, out)).is_ok()
}

fn write_events(rx: Receiver<Message>, mut out: Box<dyn Write + Send>) {
    for message in rx {
        match message {
            Message::Event(event) => {
                let written = serde_json::to_writer_pretty(&mut out, &event).is_ok() && out.write_all(b"\n\n").is_ok();
                if (!written || out.flush().is_err())
                    && let Some(m) = MONITOR.get()
                {
                    m.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Message::Flush(ack) => {
                let _ = out.flush();
                let _ = ack.send(());
            }
        }
    }
}

/// Queues an event; never blocks. Without a monitor, does nothing.
pub fn emit(source: &str, event: &str, properties: Option<Map<String, Value>>) {
    let Some(m) = MONITOR.get() else { return };
    let elapsed = m.start.elapsed();
    let mut properties = properties;
    let dropped = m.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        properties.get_or_insert_with(Map::new).insert("events_dropped".into(), Value::from(dropped));
    }
    let event = Event {
        timestamp: Timestamp { secs: elapsed.as_secs(), nanos: elapsed.subsec_nanos() },
        source: source.into(),
        event: event.into(),
        properties,
    };
    let Ok(queue) = m.queue.lock() else { return };
    match queue.try_send(Message::Event(event)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            // Counted, and reported with the next event that gets through.
            m.dropped.fetch_add(dropped + 1, Ordering::Relaxed);
        }
    }
}

/// Emits an event whose properties are string pairs.
pub fn emit_strings(source: &str, event: &str, properties: &[(&str, String)]) {
    let props = (!properties.is_empty())
        .then(|| properties.iter().map(|(k, v)| (k.to_string(), Value::from(v.as_str()))).collect());
    emit(source, event, props);
}

/// Waits (up to `timeout`) until every event queued so far is written.
pub fn flush(timeout: Duration) -> bool {
    let Some(m) = MONITOR.get() else { return true };
    let (ack_tx, ack_rx) = sync_channel(1);
    let sent = m.queue.lock().map(|q| q.send(Message::Flush(ack_tx)).is_ok()).unwrap_or(false);
    sent && ack_rx.recv_timeout(timeout).is_ok()
}

/// Events dropped since the last one written (for counters).
pub fn dropped_events() -> u64 {
    MONITOR.get().map(|m| m.dropped.load(Ordering::Relaxed)).unwrap_or(0)
}

/// Parses an event stream back into JSON values (tests and tools use this).
pub fn parse_events(stream: &str) -> Result<Vec<Value>, serde_json::Error> {
    serde_json::Deserializer::from_str(stream).into_iter::<Value>().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct SharedBuf(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    // One process-wide monitor, so one test exercises it end to end.
    #[test]
    fn events_are_written_in_order_as_pretty_json_separated_by_blank_lines() {
        let buf = SharedBuf::default();
        assert!(set_monitor(Box::new(buf.clone())));
        emit("vmm", "starting", None);
        emit_strings("heki", "violation", &[("kind", "write".into()), ("gpa", "0x1000".into())]);
        assert!(flush(Duration::from_secs(5)));
        let text = String::from_utf8(buf.0.lock().expect("buffer").clone()).expect("utf-8");
        assert!(text.contains("\n\n"), "events separated by a blank line");
        let events = parse_events(&text).expect("valid JSON stream");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["source"], "vmm");
        assert_eq!(events[0]["event"], "starting");
        assert!(events[0]["properties"].is_null());
        assert!(events[0]["timestamp"]["secs"].is_u64() && events[0]["timestamp"]["nanos"].is_u64());
        assert_eq!(events[1]["properties"]["kind"], "write");
        assert!(!set_monitor(Box::new(std::io::sink())), "only the first monitor takes effect");
    }

    #[test]
    fn parse_events_rejects_garbage() {
        assert!(parse_events("{\"a\":1}\n\n{").is_err());
    }
}
