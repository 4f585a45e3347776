//! The JSON event stream: what happened to the VMM, the VM and its integrity.
//!
//! Events are written as Cloud Hypervisor writes them: one pretty-printed JSON
//! object per event, separated by a blank line:
//! `{"timestamp":{"secs":..,"nanos":..},"source":..,"event":..,"properties":{..}|null}`,
//! the timestamp being the time since `start_clock` (or the monitor's start).
//!
//! `emit` never blocks: events go through a bounded queue to a writer thread.
//! Events the queue cannot take are counted; the count is added as
//! `events_dropped` to the next event written, or written as an
//! `events-dropped` event by `flush`. Nothing is dropped silently.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

#[doc(hidden)]
pub use serde_json as __serde_json;

/// How many events may wait for the writer before new ones are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 4096;

/// Property name carrying the count of events dropped before this one.
pub const DROPPED_PROPERTY: &str = "events_dropped";

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

/// One event stream: a bounded queue and the thread writing it out.
pub struct Monitor {
    start: Instant,
    queue: SyncSender<Message>,
    /// Events lost (queue full or write failed) and not yet reported.
    dropped: Arc<AtomicU64>,
}

impl Monitor {
    /// Starts a writer thread for `out`; timestamps count from `start`.
    pub fn new<W: Write + Send + 'static>(out: W, start: Instant, capacity: usize) -> std::io::Result<Monitor> {
        Monitor::with_thread_start(out, start, capacity, || {})
    }

    /// As `new`; the writer thread first runs `on_start` (the VMM installs
    /// the thread's seccomp filter there).
    pub fn with_thread_start<W: Write + Send + 'static>(
        out: W,
        start: Instant,
        capacity: usize,
        on_start: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Monitor> {
        let (queue, rx) = sync_channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer_dropped = dropped.clone();
        std::thread::Builder::new().name("event-monitor".into()).spawn(move || {
            on_start();
            write_events(rx, out, start, &writer_dropped)
        })?;
        Ok(Monitor { start, queue, dropped })
    }

    /// Queues an event; never blocks. If the queue is full the event is
    /// counted; the writer reports the count with the next event it writes.
    pub fn emit(&self, source: &str, event: &str, properties: Option<Map<String, Value>>) {
        let event = Event { timestamp: timestamp(self.start), source: source.into(), event: event.into(), properties };
        if self.queue.try_send(Message::Event(event)).is_err() {
            self.dropped.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Waits (up to `timeout`) until every event queued so far is written;
    /// drops not yet reported are written as an `events-dropped` event.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (ack_tx, ack_rx) = sync_channel(1);
        let mut flush = Message::Flush(ack_tx);
        loop {
            match self.queue.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    flush = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        ack_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()
    }

    /// Events lost and not yet reported in the stream.
    pub fn dropped_events(&self) -> u64 {
        self.dropped.load(Ordering::Acquire)
    }
}

fn timestamp(start: Instant) -> Timestamp {
    let elapsed = start.elapsed();
    Timestamp { secs: elapsed.as_secs(), nanos: elapsed.subsec_nanos() }
}

fn write_events<W: Write>(rx: Receiver<Message>, mut out: W, start: Instant, dropped: &AtomicU64) {
    for message in rx {
        match message {
            Message::Event(mut event) => {
                // Events lost since the last write (queue full or a failed write).
                let lost = dropped.swap(0, Ordering::AcqRel);
                if lost > 0 {
                    let properties = event.properties.get_or_insert_with(Map::new);
                    properties.insert(DROPPED_PROPERTY.into(), Value::from(lost));
                }
                let mut text = serde_json::to_vec_pretty(&event).unwrap_or_default();
                text.extend_from_slice(b"\n\n");
                if out.write_all(&text).and_then(|()| out.flush()).is_err() {
                    dropped.fetch_add(1 + lost, Ordering::AcqRel);
                }
            }
            Message::Flush(ack) => {
                let lost = dropped.swap(0, Ordering::AcqRel);
                if lost > 0 {
                    let mut properties = Map::new();
                    properties.insert(DROPPED_PROPERTY.into(), Value::from(lost));
                    let event = Event {
                        timestamp: timestamp(start),
                        source: "monitor".into(),
                        event: "events-dropped".into(),
                        properties: Some(properties),
                    };
                    let mut text = serde_json::to_vec_pretty(&event).unwrap_or_default();
                    text.extend_from_slice(b"\n\n");
                    if out.write_all(&text).is_err() {
                        dropped.fetch_add(lost, Ordering::AcqRel);
                    }
                }
                let _ = out.flush();
                let _ = ack.send(());
            }
        }
    }
}

static CLOCK: OnceLock<Instant> = OnceLock::new();
static MONITOR: OnceLock<Monitor> = OnceLock::new();

/// Sets time zero for event timestamps (the first call wins). Call it when
/// the VMM starts; `set_monitor` calls it too.
pub fn start_clock() -> Instant {
    *CLOCK.get_or_init(Instant::now)
}

/// Starts the process-wide event stream to `out` (a `File`, usually).
/// Only the first call takes effect; returns whether this one did.
pub fn set_monitor<W: Write + Send + 'static>(out: W) -> bool {
    set_monitor_with_thread_start(out, || {})
}

/// As `set_monitor`; the writer thread first runs `on_start`.
pub fn set_monitor_with_thread_start<W: Write + Send + 'static>(
    out: W,
    on_start: impl FnOnce() + Send + 'static,
) -> bool {
    if MONITOR.get().is_some() {
        return false;
    }
    match Monitor::with_thread_start(out, start_clock(), QUEUE_CAPACITY, on_start) {
        Ok(monitor) => MONITOR.set(monitor).is_ok(),
        Err(_) => false,
    }
}

/// Queues an event on the process-wide stream; never blocks. Without a
/// monitor, does nothing.
pub fn emit(source: &str, event: &str, properties: Option<Map<String, Value>>) {
    if let Some(m) = MONITOR.get() {
        m.emit(source, event, properties);
    }
}

/// Emits an event whose properties are string pairs.
pub fn emit_strings(source: &str, event: &str, properties: &[(&str, String)]) {
    if MONITOR.get().is_none() {
        return;
    }
    let props = (!properties.is_empty())
        .then(|| properties.iter().map(|(k, v)| (k.to_string(), Value::from(v.as_str()))).collect());
    emit(source, event, props);
}

/// Emits an event: `event!("vm", "booted")` or
/// `event!("heki", "violation", "kind" => "write", "gpa" => 0x1000)`.
/// Property values are anything `serde_json::json!` accepts.
#[macro_export]
macro_rules! event {
    ($source:expr, $event:expr) => {
        $crate::emit($source, $event, None)
    };
    ($source:expr, $event:expr, $($key:expr => $value:expr),+ $(,)?) => {{
        let mut properties = $crate::__serde_json::Map::new();
        $(properties.insert(::std::string::String::from($key), $crate::__serde_json::json!($value));)+
        $crate::emit($source, $event, Some(properties))
    }};
}

/// Waits (up to `timeout`) until every event queued so far is written.
/// Returns false if that did not happen in time. Without a monitor, true.
pub fn flush(timeout: Duration) -> bool {
    MONITOR.get().is_none_or(|m| m.flush(timeout))
}

/// Events dropped and not yet reported in the stream (for counters).
pub fn dropped_events() -> u64 {
    MONITOR.get().map(Monitor::dropped_events).unwrap_or(0)
}

/// Parses an event stream back into JSON values (tests and tools use this).
pub fn parse_events(stream: &str) -> Result<Vec<Value>, serde_json::Error> {
    serde_json::Deserializer::from_str(stream).into_iter::<Value>().collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use super::*;

    /// An in-memory sink; while `hold` is set, writes wait.
    #[derive(Clone, Default)]
    struct Sink {
        data: Arc<Mutex<Vec<u8>>>,
        gate: Arc<(Mutex<bool>, Condvar)>,
        fail: Arc<Mutex<bool>>,
    }

    impl Sink {
        fn hold(&self, held: bool) {
            *self.gate.0.lock().expect("gate") = held;
            self.gate.1.notify_all();
        }
        fn text(&self) -> String {
            String::from_utf8(self.data.lock().expect("data").clone()).expect("utf-8")
        }
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut held = self.gate.0.lock().expect("gate");
            while *held {
                held = self.gate.1.wait(held).expect("gate");
            }
            if *self.fail.lock().expect("fail") {
                return Err(std::io::Error::other("disk full"));
            }
            self.data.lock().expect("data").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn dropped_in(events: &[Value]) -> u64 {
        events.iter().filter_map(|e| e["properties"][DROPPED_PROPERTY].as_u64()).sum()
    }

    #[test]
    fn events_are_pretty_json_in_order_separated_by_blank_lines() {
        let sink = Sink::default();
        let monitor = Monitor::new(sink.clone(), Instant::now(), 16).expect("monitor");
        monitor.emit("vmm", "starting", None);
        let mut props = Map::new();
        props.insert("kind".into(), "write".into());
        monitor.emit("heki", "violation", Some(props));
        assert!(monitor.flush(Duration::from_secs(5)));
        let text = sink.text();
        assert!(text.contains("}\n\n{"), "events separated by a blank line: {text}");
        assert!(text.contains("\n  \"source\": \"vmm\""), "pretty printed: {text}");
        let events = parse_events(&text).expect("valid JSON stream");
        assert_eq!(events.len(), 2);
        assert_eq!((events[0]["source"].as_str(), events[0]["event"].as_str()), (Some("vmm"), Some("starting")));
        assert!(events[0]["properties"].is_null());
        assert!(events[0]["timestamp"]["secs"].is_u64() && events[0]["timestamp"]["nanos"].is_u64());
        assert_eq!(events[1]["properties"]["kind"], "write");
        let t = |e: &Value| (e["timestamp"]["secs"].as_u64(), e["timestamp"]["nanos"].as_u64());
        assert!(t(&events[0]) <= t(&events[1]), "timestamps do not go backwards");
    }

    #[test]
    fn overflow_never_blocks_and_every_dropped_event_is_reported() {
        let sink = Sink::default();
        sink.hold(true);
        let monitor = Monitor::new(sink.clone(), Instant::now(), 8).expect("monitor");
        let start = Instant::now();
        for _ in 0..100 {
            monitor.emit("vm", "tick", None);
        }
        assert!(start.elapsed() < Duration::from_secs(1), "emit blocked");
        assert!(monitor.dropped_events() > 0);
        sink.hold(false);
        monitor.emit("vm", "after", None);
        assert!(monitor.flush(Duration::from_secs(5)));
        let events = parse_events(&sink.text()).expect("stream");
        assert!(dropped_in(&events) > 0);
        assert_eq!(events.len() as u64 + dropped_in(&events), 101, "written + reported dropped = emitted");
        assert_eq!(monitor.dropped_events(), 0);
    }

    #[test]
    fn drops_with_no_later_event_are_reported_by_flush() {
        let sink = Sink::default();
        let monitor = Monitor::new(sink.clone(), Instant::now(), 16).expect("monitor");
        *sink.fail.lock().expect("fail") = true;
        monitor.emit("vm", "lost", None);
        monitor.emit("vm", "lost", None);
        assert!(monitor.flush(Duration::from_secs(5)));
        assert_eq!(monitor.dropped_events(), 2, "failed writes are counted");
        *sink.fail.lock().expect("fail") = false;
        assert!(monitor.flush(Duration::from_secs(5)));
        let events = parse_events(&sink.text()).expect("stream");
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(
            (events[0]["source"].as_str(), events[0]["event"].as_str()),
            (Some("monitor"), Some("events-dropped"))
        );
        assert_eq!(dropped_in(&events), 2);
    }

    #[test]
    fn queue_overflow_counts_add_up() {
        let sink = Sink::default();
        sink.hold(true);
        let monitor = Monitor::new(sink.clone(), Instant::now(), 2).expect("monitor");
        for _ in 0..10 {
            monitor.emit("vm", "tick", None);
        }
        sink.hold(false);
        assert!(monitor.flush(Duration::from_secs(5)));
        let events = parse_events(&sink.text()).expect("stream");
        assert_eq!(events.len() as u64 + dropped_in(&events), 10, "{events:?}");
        assert!(events.len() < 10);
    }

    #[test]
    fn flush_times_out_when_the_writer_is_stuck() {
        let sink = Sink::default();
        sink.hold(true);
        let monitor = Monitor::new(sink.clone(), Instant::now(), 4).expect("monitor");
        monitor.emit("vm", "stuck", None);
        let start = Instant::now();
        assert!(!monitor.flush(Duration::from_millis(100)));
        assert!(start.elapsed() < Duration::from_secs(2));
        sink.hold(false);
    }

    // The process-wide monitor can be set once, so one test covers it.
    #[test]
    fn global_monitor_and_event_macro() {
        let sink = Sink::default();
        let zero = start_clock();
        assert!(set_monitor(sink.clone()));
        assert!(!set_monitor(std::io::sink()), "only the first monitor takes effect");
        event!("vm", "booted");
        event!("heki", "violation", "kind" => "write", "gpa" => 0x1000u64, "denied" => true);
        emit_strings("vmm", "shutdown", &[("reason", "api".into())]);
        assert!(flush(Duration::from_secs(5)));
        let events = parse_events(&sink.text()).expect("stream");
        assert_eq!(events.len(), 3);
        assert!(events[0]["properties"].is_null());
        assert_eq!(events[1]["properties"], serde_json::json!({"kind": "write", "gpa": 4096, "denied": true}));
        assert_eq!(events[2]["properties"]["reason"], "api");
        assert_eq!(start_clock(), zero, "the clock starts once");
    }

    #[test]
    fn parse_events_rejects_garbage() {
        assert!(parse_events("{\"a\":1}\n\n{").is_err());
        assert_eq!(parse_events("").expect("empty").len(), 0);
    }
}
