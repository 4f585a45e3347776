//! Events the agent receives from the exit path, formatted without a JSON tree.

use introspection_protocol::EventLine;

/// The `write` event of a tracked write. A write that touches a page the
/// guest keeps private carries `"private": true` instead of its `value`:
/// private bytes reach no one on the host, the agent included.
pub(super) fn write_event(gpa: u64, data: &[u8], heki_locked: bool, private: bool) -> EventLine {
    let event = EventLine::new("write").num("gpa", gpa).num("size", data.len() as u64);
    let event = if private {
        event.flag("private", true)
    } else {
        let mut value = [0u8; 8];
        let n = data.len().min(8);
        value[..n].copy_from_slice(&data[..n]);
        event.num("value", u64::from_le_bytes(value))
    };
    event.flag("heki_locked", heki_locked)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn parsed(event: EventLine) -> Value {
        serde_json::from_str(&event.finish()).expect("JSON")
    }

    #[test]
    fn a_write_event_carries_the_value_of_a_shared_page() {
        let event = parsed(write_event(0x5000, &[0x11, 0x22, 0, 0, 0, 0, 0, 0], false, false));
        assert_eq!(event, json!({"event": "write", "gpa": 0x5000, "size": 8, "value": 0x2211, "heki_locked": false}));
    }

    #[test]
    fn a_write_event_to_a_private_page_carries_no_byte_of_it() {
        let data = [0x5e, 0xc7, 0xe7, 0x5e, 0xc7, 0xe7, 0x5e, 0xc7];
        let line = write_event(0x5000, &data, false, true).finish();
        let event: Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(event, json!({"event": "write", "gpa": 0x5000, "size": 8, "private": true, "heki_locked": false}));
        assert!(!line.contains(&u64::from_le_bytes(data).to_string()), "{line}");
    }
}
