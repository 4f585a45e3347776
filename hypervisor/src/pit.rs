//! The in-kernel 8254 PIT's state, as plain structs (no KVM type leaks out).

use kvm_bindings::{KVM_PIT_FLAGS_SPEAKER_DATA_ON, kvm_pit_channel_state, kvm_pit_state2};

/// One 8254 counter as KVM keeps it. The `*_state` fields hold KVM's
/// access-state codes (1 LSB, 2 MSB, 3 low byte of a word, 4 its high byte).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PitChannel {
    /// The reload value; 0x10000 stands for a programmed 0.
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    /// 0..=5, or 0xff for a counter never programmed since reset.
    pub mode: u8,
    pub bcd: u8,
    pub gate: u8,
    count_load_time: i64,
}

/// The three counters plus port 0x61's speaker bit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PitState {
    pub channels: [PitChannel; 3],
    pub speaker_data_on: bool,
    /// KVM's other flag bits (HPET legacy routing), kept as they were.
    other_flags: u32,
}

impl From<&kvm_pit_channel_state> for PitChannel {
    fn from(c: &kvm_pit_channel_state) -> Self {
        PitChannel {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            status: c.status,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
            count_load_time: c.count_load_time,
        }
    }
}

impl From<&PitChannel> for kvm_pit_channel_state {
    fn from(c: &PitChannel) -> Self {
        kvm_pit_channel_state {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            status: c.status,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
            count_load_time: c.count_load_time,
        }
    }
}

impl From<&kvm_pit_state2> for PitState {
    fn from(s: &kvm_pit_state2) -> Self {
        PitState {
            channels: [(&s.channels[0]).into(), (&s.channels[1]).into(), (&s.channels[2]).into()],
            speaker_data_on: s.flags & KVM_PIT_FLAGS_SPEAKER_DATA_ON != 0,
            other_flags: s.flags & !KVM_PIT_FLAGS_SPEAKER_DATA_ON,
        }
    }
}

impl From<&PitState> for kvm_pit_state2 {
    fn from(s: &PitState) -> Self {
        let speaker = if s.speaker_data_on { KVM_PIT_FLAGS_SPEAKER_DATA_ON } else { 0 };
        kvm_pit_state2 {
            channels: [(&s.channels[0]).into(), (&s.channels[1]).into(), (&s.channels[2]).into()],
            flags: s.other_flags | speaker,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_the_round_trip_through_kvm_layout() {
        let mut kvm = kvm_pit_state2 { flags: 3, ..Default::default() };
        kvm.channels[2] =
            kvm_pit_channel_state { count: 0x10000, mode: 0xff, gate: 0, rw_mode: 3, ..Default::default() };
        let ours = PitState::from(&kvm);
        assert!(ours.speaker_data_on);
        assert_eq!(ours.channels[2].mode, 0xff);
        let back = kvm_pit_state2::from(&ours);
        assert_eq!(back.flags, 3);
        assert_eq!(back.channels[2].count, 0x10000);
        assert_eq!(back.channels[2].rw_mode, 3);
    }
}
