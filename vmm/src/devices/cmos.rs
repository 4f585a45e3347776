//! The CMOS real-time clock at ports 0x70 (index) and 0x71 (data): the
//! host's UTC time, never "update in progress", and 128 bytes of CMOS RAM.
//!
//! Without it the ports read as an open bus (0xff), so the update-in-progress
//! bit looked set forever and Linux's boot-time clock read
//! (`mc146818_avoid_UIP`) polled for its whole one-second timeout: 40,000
//! port exits and a second of busy-waiting per boot here, before "Unable to
//! read current time from RTC". No alarm or periodic interrupts; writes to
//! the time registers are dropped (the clock follows the host).

use std::time::{SystemTime, UNIX_EPOCH};

use super::{DeviceAction, PioDevice};

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const DAY_OF_WEEK: u8 = 0x06;
const DAY_OF_MONTH: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
/// Where PC firmware keeps the century (ACPI FADT's default).
const CENTURY: u8 = 0x32;

/// Status B: 24-hour mode (bit 1) and binary rather than BCD (bit 2).
const B_24_HOUR: u8 = 0x02;
const B_BINARY: u8 = 0x04;
/// Status D: the battery is good and the RAM valid.
const D_VALID: u8 = 0x80;

/// Reads the wall clock; a test gives a fixed time.
pub type Clock = fn() -> u64;

fn host_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub struct CmosRtc {
    index: u8,
    ram: [u8; 128],
    clock: Clock,
}

impl Default for CmosRtc {
    fn default() -> Self {
        CmosRtc::with_clock(host_seconds)
    }
}

impl CmosRtc {
    pub fn with_clock(clock: Clock) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(STATUS_A)] = 0x26; // 32.768 kHz time base, 1.024 kHz rate; UIP clear
        ram[usize::from(STATUS_B)] = B_24_HOUR; // 24-hour, BCD: what PC firmware leaves
        CmosRtc { index: 0, ram, clock }
    }

    fn read_register(&self, index: u8) -> u8 {
        let (date, [hour, minute, second]) = civil_time((self.clock)());
        let b = self.ram[usize::from(STATUS_B)];
        let encode = |v: u8| if b & B_BINARY != 0 { v } else { ((v / 10) << 4) | (v % 10) };
        match index {
            SECONDS => encode(second),
            MINUTES => encode(minute),
            HOURS if b & B_24_HOUR != 0 => encode(hour),
            // 12-hour mode: 12, 1..11, with bit 7 for PM.
            HOURS => encode(if hour % 12 == 0 { 12 } else { hour % 12 }) | if hour >= 12 { 0x80 } else { 0 },
            DAY_OF_WEEK => encode(date.weekday),
            DAY_OF_MONTH => encode(date.day),
            MONTH => encode(date.month),
            YEAR => encode((date.year % 100) as u8),
            CENTURY => encode((date.year / 100) as u8),
            STATUS_C => 0,
            STATUS_D => D_VALID,
            _ => self.ram[usize::from(index)],
        }
    }
}

impl PioDevice for CmosRtc {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = if offset == 1 { self.read_register(self.index) } else { 0xff };
        data.fill(value);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        let Some(&value) = data.first() else { return DeviceAction::None };
        match offset {
            // Bit 7 of the index port masks NMIs on a PC; there is nothing to mask.
            0 => self.index = value & 0x7f,
            1 => match self.index {
                SECONDS..=YEAR | STATUS_C | STATUS_D | CENTURY => {}
                // The update-in-progress bit is read-only.
                STATUS_A => self.ram[usize::from(STATUS_A)] = value & 0x7f,
                index => self.ram[usize::from(index)] = value,
            },
            _ => {}
        }
        DeviceAction::None
    }
}

struct Date {
    year: u32,
    month: u8,
    day: u8,
    /// 1 = Sunday, as the MC146818 counts.
    weekday: u8,
}

/// Splits seconds since 1970 (UTC) into a calendar date and the time of day,
/// with the proleptic Gregorian calendar (days-to-civil by era of 400 years).
fn civil_time(epoch_seconds: u64) -> (Date, [u8; 3]) {
    let days = epoch_seconds / 86_400;
    let secs = epoch_seconds % 86_400;
    let time = [(secs / 3600) as u8, (secs / 60 % 60) as u8, (secs % 60) as u8];
    // 1970-01-01 was a Thursday.
    let weekday = ((days + 4) % 7 + 1) as u8;
    // Shift the epoch to 0000-03-01 so that leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u8;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 } as u8;
    let year = (year_of_era + era * 400 + u64::from(month <= 2)) as u32;
    (Date { year, month, day, weekday }, time)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-03 08:55:09 UTC, a Thursday.
    fn fixed() -> u64 {
        1_796_288_109
    }

    fn read(rtc: &mut CmosRtc, index: u8) -> u8 {
        rtc.write(0, &[index | 0x80]);
        let mut data = [0u8];
        rtc.read(1, &mut data);
        data[0]
    }

    #[test]
    fn the_clock_reads_the_host_date_in_bcd_and_is_never_updating() {
        let mut rtc = CmosRtc::with_clock(fixed);
        let fields: Vec<u8> = [YEAR, MONTH, DAY_OF_MONTH, HOURS, MINUTES, SECONDS, DAY_OF_WEEK, CENTURY]
            .iter()
            .map(|&i| read(&mut rtc, i))
            .collect();
        assert_eq!(fields, [0x26, 0x12, 0x03, 0x08, 0x55, 0x09, 5, 0x20]);
        assert_eq!(read(&mut rtc, STATUS_A) & 0x80, 0, "update in progress");
        assert_eq!(read(&mut rtc, STATUS_D), D_VALID);
    }

    #[test]
    fn binary_and_12_hour_modes_follow_status_b() {
        let mut rtc = CmosRtc::with_clock(|| fixed() + 12 * 3600); // 20:55:09
        rtc.write(0, &[STATUS_B]);
        rtc.write(1, &[B_BINARY]);
        assert_eq!(read(&mut rtc, HOURS), 8 | 0x80, "8 PM");
        assert_eq!(read(&mut rtc, MINUTES), 55);
        rtc.write(0, &[STATUS_B]);
        rtc.write(1, &[B_BINARY | B_24_HOUR]);
        assert_eq!(read(&mut rtc, HOURS), 20);
    }

    #[test]
    fn cmos_ram_keeps_writes_but_the_time_and_uip_stay_the_hosts() {
        let mut rtc = CmosRtc::with_clock(fixed);
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0xab]);
        assert_eq!(read(&mut rtc, 0x40), 0xab);
        rtc.write(0, &[SECONDS]);
        rtc.write(1, &[0x30]);
        assert_eq!(read(&mut rtc, SECONDS), 0x09);
        rtc.write(0, &[STATUS_A]);
        rtc.write(1, &[0xa6]);
        assert_eq!(read(&mut rtc, STATUS_A), 0x26);
    }

    #[test]
    fn calendar_conversion_handles_leap_days_and_century_rules() {
        let date = |s| {
            let (d, t) = civil_time(s);
            (d.year, d.month, d.day, t)
        };
        assert_eq!(date(0), (1970, 1, 1, [0, 0, 0]));
        assert_eq!(date(951_782_400), (2000, 2, 29, [0, 0, 0]));
        assert_eq!(date(4_107_542_399), (2100, 2, 28, [23, 59, 59]));
        assert_eq!(date(4_107_542_400), (2100, 3, 1, [0, 0, 0]));
    }

    #[test]
    fn the_index_port_itself_reads_as_open_bus() {
        let mut rtc = CmosRtc::default();
        let mut data = [0u8; 2];
        rtc.read(0, &mut data);
        assert_eq!(data, [0xff, 0xff]);
    }
}
