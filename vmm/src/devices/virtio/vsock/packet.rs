//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, virtio 1.2
//! §5.10.6), parsed from and written to plain bytes: the device copies each
//! header out of guest memory once, through its checked view, and never
//! reads it twice.
//!
//! rust-vmm's `virtio-vsock` crate gives the header's size; its
//! `VsockPacket` keeps `VolatileSlice`s into guest memory beyond the
//! access that checked them, which would let a heki lock land between the
//! check and a later write, so the packet handling here is our own.
// Guest-supplied numbers: no unchecked arithmetic here.
#![deny(clippy::arithmetic_side_effects)]

/// Bytes in a packet header.
pub const HEADER_LEN: usize = virtio_vsock::packet::PKT_HEADER_SIZE;
const _: () = assert!(HEADER_LEN == 44, "virtio_vsock_hdr is 44 bytes");

/// The host's CID, as the guest addresses it.
pub const HOST_CID: u64 = 2;
/// `type`: the only socket type offered (VIRTIO_VSOCK_F_STREAM semantics).
pub const TYPE_STREAM: u16 = 1;

/// `op` values.
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN `flags`: the sender will receive no more data, send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Payload bytes that follow the header.
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    /// The sender's receive buffer, and how much of it the sender has consumed.
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn le<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = bytes.get(at..at.saturating_add(N)) {
        out.copy_from_slice(src);
    }
    out
}

impl Header {
    /// The header at the start of `bytes`; `None` if there are fewer than `HEADER_LEN`.
    pub fn parse(bytes: &[u8]) -> Option<Header> {
        let b = bytes.get(..HEADER_LEN)?;
        Some(Header {
            src_cid: u64::from_le_bytes(le(b, 0)),
            dst_cid: u64::from_le_bytes(le(b, 8)),
            src_port: u32::from_le_bytes(le(b, 16)),
            dst_port: u32::from_le_bytes(le(b, 20)),
            len: u32::from_le_bytes(le(b, 24)),
            type_: u16::from_le_bytes(le(b, 28)),
            op: u16::from_le_bytes(le(b, 30)),
            flags: u32::from_le_bytes(le(b, 32)),
            buf_alloc: u32::from_le_bytes(le(b, 36)),
            fwd_cnt: u32::from_le_bytes(le(b, 40)),
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let fields: [&[u8]; 10] = [
            &self.src_cid.to_le_bytes(),
            &self.dst_cid.to_le_bytes(),
            &self.src_port.to_le_bytes(),
            &self.dst_port.to_le_bytes(),
            &self.len.to_le_bytes(),
            &self.type_.to_le_bytes(),
            &self.op.to_le_bytes(),
            &self.flags.to_le_bytes(),
            &self.buf_alloc.to_le_bytes(),
            &self.fwd_cnt.to_le_bytes(),
        ];
        let mut at = 0usize;
        for field in fields {
            let end = at.saturating_add(field.len());
            out[at..end].copy_from_slice(field);
            at = end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_through_its_little_endian_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 1024,
            len: 7,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 1 << 18,
            fwd_cnt: 0xdead_beef,
        };
        let bytes = h.to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[20..24], &1024u32.to_le_bytes());
        assert_eq!(&bytes[30..32], &op::RW.to_le_bytes());
        assert_eq!(&bytes[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(Header::parse(&bytes), Some(h));
    }

    #[test]
    fn a_short_buffer_is_no_header() {
        assert_eq!(Header::parse(&[0u8; HEADER_LEN - 1]), None);
        assert!(Header::parse(&[0u8; HEADER_LEN + 9]).is_some(), "payload bytes after the header are ignored");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_and_re_encode_to_themselves(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), HEADER_LEN..HEADER_LEN + 8)) {
            let h = Header::parse(&bytes).expect("long enough");
            proptest::prop_assert_eq!(&h.to_bytes()[..], &bytes[..HEADER_LEN]);
        }
    }
}
