//! One guest access to the 8254's ports, applied to the PIT's state with the
//! semantics of KVM's in-kernel model (`arch/x86/kvm/i8254.c`).
//!
//! It answers exactly one access: the one that made the VMM create the
//! in-kernel PIT (`super::OnDemandPit`), which KVM never saw. Every later
//! access is KVM's own. Time is frozen at the instant of creation: a counter
//! reads as its reload value and an output as low, which is what the PIT
//! created at that instant would answer (the speaker port's refresh bit,
//! which toggles every 15 µs anyway, reads as 0).

use hypervisor::{PitChannel, PitState};

/// Counter ports 0x40-0x42 and the mode/command port 0x43.
pub const PIT_BASE: u16 = 0x40;
pub const PIT_PORTS: u16 = 4;
/// Port 0x61: speaker data (bit 1) and channel 2's gate (bit 0).
pub const SPEAKER_PORT: u16 = 0x61;

const COMMAND: u16 = 3;

// KVM's access states (`rw_mode`, `read_state`, `write_state`, `count_latched`);
// 1, the low byte alone, is the default arm of each match below.
const MSB: u8 = 2;
const WORD_LOW: u8 = 3;
const WORD_HIGH: u8 = 4;

/// What one access did: the byte a read returns, and whether the state
/// changed (then it has to be written back to KVM).
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub value: u8,
    pub changed: bool,
}

/// Applies a read (`write == None`) or a write of one byte to `port`.
/// Ports other than 0x40-0x43 and 0x61 are left alone and read as 0xff.
pub fn apply(state: &mut PitState, port: u16, write: Option<u8>) -> Outcome {
    let before = *state;
    let value = match (port, write) {
        (SPEAKER_PORT, None) => speaker_read(state),
        (SPEAKER_PORT, Some(v)) => {
            state.speaker_data_on = v & 2 != 0;
            state.channels[2].gate = v & 1;
            0
        }
        (p, None) if (PIT_BASE..PIT_BASE + COMMAND).contains(&p) => {
            counter_read(&mut state.channels[usize::from(p - PIT_BASE)])
        }
        (p, Some(v)) if (PIT_BASE..PIT_BASE + COMMAND).contains(&p) => {
            counter_write(&mut state.channels[usize::from(p - PIT_BASE)], v);
            0
        }
        (p, Some(v)) if p == PIT_BASE + COMMAND => {
            command_write(state, v);
            0
        }
        // The command port is write-only: KVM reads it as 0.
        (p, None) if p == PIT_BASE + COMMAND => 0,
        _ => 0xff,
    };
    Outcome { value, changed: *state != before }
}

fn speaker_read(state: &PitState) -> u8 {
    (u8::from(state.speaker_data_on) << 1) | (state.channels[2].gate & 1)
}

/// The counter's value at the instant it was (re)loaded.
fn current_count(c: &PitChannel) -> u16 {
    (c.count & 0xffff) as u16
}

fn counter_read(c: &mut PitChannel) -> u8 {
    if c.status_latched != 0 {
        c.status_latched = 0;
        return c.status;
    }
    let [low, high] = if c.count_latched != 0 { c.latched_count } else { current_count(c) }.to_le_bytes();
    if c.count_latched != 0 {
        match c.count_latched {
            MSB => {
                c.count_latched = 0;
                high
            }
            WORD_LOW => {
                c.count_latched = MSB;
                low
            }
            _ => {
                c.count_latched = 0;
                low
            }
        }
    } else {
        match c.read_state {
            MSB => high,
            WORD_LOW => {
                c.read_state = WORD_HIGH;
                low
            }
            WORD_HIGH => {
                c.read_state = WORD_LOW;
                high
            }
            _ => low,
        }
    }
}

fn load(c: &mut PitChannel, value: u32) {
    c.count = if value == 0 { 0x10000 } else { value };
}

fn counter_write(c: &mut PitChannel, v: u8) {
    match c.write_state {
        MSB => load(c, u32::from(v) << 8),
        WORD_LOW => {
            c.write_latch = v;
            c.write_state = WORD_HIGH;
        }
        WORD_HIGH => {
            load(c, u32::from(c.write_latch) | (u32::from(v) << 8));
            c.write_state = WORD_LOW;
        }
        _ => load(c, u32::from(v)),
    }
}

fn latch_count(c: &mut PitChannel) {
    if c.count_latched == 0 {
        c.latched_count = current_count(c);
        c.count_latched = c.rw_mode;
    }
}

fn latch_status(c: &mut PitChannel) {
    if c.status_latched == 0 {
        // Output low (bit 7) at the instant of creation.
        c.status = (c.rw_mode << 4) | (c.mode << 1) | c.bcd;
        c.status_latched = 1;
    }
}

fn command_write(state: &mut PitState, v: u8) {
    let channel = usize::from(v >> 6);
    if channel == 3 {
        // Read-back: bits 1-3 select counters; bit 5 clear latches counts, bit 4 clear latches status.
        for (i, c) in state.channels.iter_mut().enumerate() {
            if v & (2 << i) != 0 {
                if v & 0x20 == 0 {
                    latch_count(c);
                }
                if v & 0x10 == 0 {
                    latch_status(c);
                }
            }
        }
        return;
    }
    let c = &mut state.channels[channel];
    let access = (v >> 4) & 3;
    if access == 0 {
        latch_count(c);
        return;
    }
    c.rw_mode = access;
    c.read_state = access;
    c.write_state = access;
    let mode = (v >> 1) & 7;
    c.mode = if mode > 5 { mode - 4 } else { mode };
    c.bcd = v & 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state KVM reports for a PIT just created (`kvm_pit_reset`).
    fn fresh() -> PitState {
        let mut s = PitState::default();
        for (i, c) in s.channels.iter_mut().enumerate() {
            c.mode = 0xff;
            c.gate = u8::from(i != 2);
            c.count = 0x10000;
        }
        s
    }

    #[test]
    fn linux_calibration_opening_reads_the_speaker_port_unchanged() {
        // quick_pit_calibrate() starts with inb(0x61).
        let mut s = fresh();
        assert_eq!(apply(&mut s, SPEAKER_PORT, None), Outcome { value: 0, changed: false });
    }

    #[test]
    fn speaker_write_sets_gate_two_and_speaker_bit() {
        let mut s = fresh();
        assert!(apply(&mut s, SPEAKER_PORT, Some(0x03)).changed);
        assert_eq!(s.channels[2].gate, 1);
        assert!(s.speaker_data_on);
        assert_eq!(apply(&mut s, SPEAKER_PORT, None).value, 0x03);
    }

    #[test]
    fn mode_command_sets_access_and_mode_without_loading() {
        let mut s = fresh();
        // Channel 0, low then high byte, mode 2 (rate generator): Linux's periodic tick.
        assert!(apply(&mut s, 0x43, Some(0x34)).changed);
        let c = s.channels[0];
        assert_eq!((c.rw_mode, c.read_state, c.write_state, c.mode, c.bcd), (3, 3, 3, 2, 0));
        assert_eq!(c.count, 0x10000);
        // Modes 6 and 7 are aliases of 2 and 3.
        apply(&mut s, 0x43, Some(0x7e));
        assert_eq!(s.channels[1].mode, 3);
    }

    #[test]
    fn word_writes_load_after_the_high_byte() {
        let mut s = fresh();
        apply(&mut s, 0x43, Some(0xb0)); // channel 2, word, mode 0
        apply(&mut s, 0x42, Some(0x34));
        assert_eq!(s.channels[2].count, 0x10000, "not loaded after the low byte");
        apply(&mut s, 0x42, Some(0x12));
        assert_eq!(s.channels[2].count, 0x1234);
        assert_eq!(s.channels[2].write_state, WORD_LOW);
    }

    #[test]
    fn counter_write_on_a_fresh_counter_loads_the_low_byte_like_kvm() {
        let mut s = fresh();
        apply(&mut s, 0x40, Some(0x9c));
        assert_eq!(s.channels[0].count, 0x9c);
        apply(&mut s, 0x41, Some(0));
        assert_eq!(s.channels[1].count, 0x10000, "0 stands for 65536");
    }

    #[test]
    fn latched_word_reads_low_then_high_and_then_unlatches() {
        let mut s = fresh();
        apply(&mut s, 0x43, Some(0x30));
        apply(&mut s, 0x40, Some(0x78));
        apply(&mut s, 0x40, Some(0x56));
        apply(&mut s, 0x43, Some(0x00)); // latch channel 0
        assert_eq!(apply(&mut s, 0x40, None).value, 0x78);
        assert_eq!(apply(&mut s, 0x40, None).value, 0x56);
        assert_eq!(s.channels[0].count_latched, 0);
    }

    #[test]
    fn read_back_latches_status_first() {
        let mut s = fresh();
        apply(&mut s, 0x43, Some(0xb6)); // channel 2, word, mode 3
        apply(&mut s, 0x43, Some(0xc8)); // read-back count and status of channel 2
        assert_eq!(apply(&mut s, 0x42, None).value, 0x36, "status: access 3, mode 3, binary");
        assert_eq!(apply(&mut s, 0x42, None).value, 0x00, "then the latched count's low byte");
    }

    #[test]
    fn unrelated_ports_and_the_command_port_read_without_change() {
        let mut s = fresh();
        assert_eq!(apply(&mut s, 0x43, None), Outcome { value: 0, changed: false });
        assert_eq!(apply(&mut s, 0x44, None), Outcome { value: 0xff, changed: false });
        assert_eq!(apply(&mut s, 0x44, Some(1)), Outcome { value: 0xff, changed: false });
    }
}
