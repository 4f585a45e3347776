#![allow(clippy::arithmetic_side_effects)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::devices::virtio::vsock::packet::HEADER_LEN;

const CID: u64 = 3;

/// A fresh directory for one test's sockets.
fn socket_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir =
        std::env::temp_dir().join(format!("hk-vsock-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("v.sock")
}

/// A packet from the guest (`src` guest port, `dst` host port) with a 64 KiB window.
fn guest(op: u16, src: u32, dst: u32, flags: u32, data: &[u8]) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        len: data.len() as u32,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn send(m: &mut Muxer, h: Header, data: &[u8]) {
    m.handle_tx(&h, data);
}

/// Every packet ready for the guest now (receive buffers of 4 KiB plus header).
fn drain(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
    let mut out = Vec::new();
    while m.has_packet() {
        out.push(m.take_packet(HEADER_LEN + 4096).expect("a packet"));
        assert!(out.len() < 10_000, "the muxer keeps producing packets");
    }
    assert_quiet(m);
    out
}

/// With nothing for the guest, the worker's descriptor is not readable
/// (or the worker would spin).
fn assert_quiet(m: &Muxer) {
    let mut fds = [libc::pollfd { fd: m.epoll_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: one valid pollfd, no timeout.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    assert_eq!(n, 0, "the epoll descriptor is readable with no packet to send");
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).expect("read") == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).expect("utf-8")
}

/// A host client connected to guest port 52 through the handshake; returns
/// it and the connection's host port.
fn host_connection(m: &mut Muxer, path: &std::path::Path) -> (UnixStream, u32) {
    let mut client = UnixStream::connect(path).expect("connect");
    client.write_all(b"CONNECT 52\n").expect("write");
    let packets = drain(m);
    assert_eq!(ops(&packets), [op::REQUEST]);
    let (request, _) = packets[0];
    assert_eq!((request.src_cid, request.dst_cid, request.dst_port), (HOST_CID, CID, 52));
    assert_eq!(request.buf_alloc, BUF_ALLOC);
    send(m, guest(op::RESPONSE, 52, request.src_port, 0, b""), b"");
    assert_eq!(read_line(&mut client), format!("OK {}\n", request.src_port));
    (client, request.src_port)
}

#[test]
fn a_host_client_reaches_a_guest_port_with_connect_and_ok() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    let (mut client, port) = host_connection(&mut m, &path);
    client.write_all(b"ping\n").expect("write");
    let packets = drain(&mut m);
    assert_eq!(ops(&packets), [op::RW]);
    assert_eq!(packets[0].1, b"ping\n");
    assert_eq!((packets[0].0.src_port, packets[0].0.dst_port), (port, 52));
    send(&mut m, guest(op::RW, 52, port, 0, b"pong\n"), b"pong\n");
    assert_eq!(read_line(&mut client), "pong\n");
}

#[test]
fn bytes_sent_right_after_the_connect_line_reach_the_guest() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    let mut client = UnixStream::connect(&path).expect("connect");
    client.write_all(b"CONNECT 7\nearly").expect("write");
    let packets = drain(&mut m);
    assert_eq!(ops(&packets), [op::REQUEST], "no data before the guest accepts");
    let port = packets[0].0.src_port;
    send(&mut m, guest(op::RESPONSE, 7, port, 0, b""), b"");
    let packets = drain(&mut m);
    assert_eq!(ops(&packets), [op::RW]);
    assert_eq!(packets[0].1, b"early");
}

#[test]
fn a_bad_connect_line_closes_the_client_without_a_packet() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    for line in [&b"HELLO 52\n"[..], b"CONNECT x\n", &[b'A'; LINE_MAX + 1][..]] {
        let mut client = UnixStream::connect(&path).expect("connect");
        client.write_all(line).expect("write");
        assert!(drain(&mut m).is_empty());
        let mut buf = [0u8; 8];
        // Closed: at its end, or reset when bytes were left unread.
        let end = client.read(&mut buf);
        assert!(matches!(end, Ok(0)) || end.is_err(), "{line:?}: closed, got {end:?}");
    }
    assert_eq!(m.connections(), 0);
}

#[test]
fn a_guest_refusal_closes_the_host_client() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    let mut client = UnixStream::connect(&path).expect("connect");
    client.write_all(b"CONNECT 52\n").expect("write");
    let request = drain(&mut m)[0].0;
    send(&mut m, guest(op::RST, 52, request.src_port, 0, b""), b"");
    assert!(drain(&mut m).is_empty(), "an RST is never answered");
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).expect("read"), 0);
}

#[test]
fn a_guest_reaches_a_host_listener_on_socket_port() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    let listener = UnixListener::bind(format!("{}_1234", path.display())).expect("host listener");
    send(&mut m, guest(op::REQUEST, 5000, 1234, 0, b""), b"");
    let packets = drain(&mut m);
    assert_eq!(ops(&packets), [op::RESPONSE]);
    assert_eq!((packets[0].0.src_port, packets[0].0.dst_port), (1234, 5000));
    let (mut host, _) = listener.accept().expect("accept");
    send(&mut m, guest(op::RW, 5000, 1234, 0, b"hello"), b"hello");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"hello");
    host.write_all(b"back").expect("write");
    let packets = drain(&mut m);
    assert_eq!(ops(&packets), [op::RW]);
    assert_eq!(packets[0].1, b"back");
}

#[test]
fn a_guest_request_to_a_port_nobody_listens_on_is_reset() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    send(&mut m, guest(op::REQUEST, 5000, 999, 0, b""), b"");
    let packets = drain(&mut m);
    assert_eq!(ops(&packets), [op::RST]);
    assert_eq!((packets[0].0.src_port, packets[0].0.dst_port), (999, 5000));
    assert_eq!(m.connections(), 0);
}

#[test]
fn host_data_waits_for_the_guest_credit() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    let (mut client, port) = host_connection(&mut m, &path);
    // The guest has 10 bytes of buffer.
    let mut credit = guest(op::CREDIT_UPDATE, 52, port, 0, b"");
    credit.buf_alloc = 10;
    send(&mut m, credit, b"");
    client.write_all(&[7u8; 25]).expect("write");
    let packets = drain(&mut m);
    assert_eq!(ops(&packets), [op::RW]);
    assert_eq!(packets[0].1.len(), 10, "no more than the credit");
    assert!(drain(&mut m).is_empty(), "nothing more until the guest consumes");
    credit.fwd_cnt = 10;
    send(&mut m, credit, b"");
    let packets = drain(&mut m);
    assert_eq!(packets.iter().map(|(_, d)| d.len()).sum::<usize>(), 10);
    credit.fwd_cnt = 20;
    send(&mut m, credit, b"");
    assert_eq!(drain(&mut m).iter().map(|(_, d)| d.len()).sum::<usize>(), 5);
}

#[test]
fn a_packet_larger_than_the_receive_buffer_is_split() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    let (mut client, _) = host_connection(&mut m, &path);
    client.write_all(&[1u8; 100]).expect("write");
    assert!(m.has_packet());
    let (first, data) = m.take_packet(HEADER_LEN + 60).expect("first part");
    assert_eq!((first.len, data.len()), (60, 60));
    let (second, data) = m.take_packet(HEADER_LEN + 60).expect("the rest");
    assert_eq!((second.op, second.len, data.len()), (op::RW, 40, 40));
    assert!(m.take_packet(HEADER_LEN - 1).is_none(), "a buffer must hold a header");
}

#[test]
fn a_guest_sending_beyond_its_credit_is_reset() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    let (client, port) = host_connection(&mut m, &path);
    // The host client does not read: what the guest sends piles up to BUF_ALLOC.
    let chunk = vec![0u8; MAX_PAYLOAD as usize];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..((BUF_ALLOC / MAX_PAYLOAD) as usize + 64) {
        send(&mut m, guest(op::RW, 52, port, 0, &chunk), &chunk);
        sent += chunk.len();
        if ops(&drain(&mut m)).contains(&op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "reset after {sent} bytes");
    assert!(sent > BUF_ALLOC as usize, "never before the credit was exceeded");
    assert_eq!(m.connections(), 0);
    drop(client);
}

#[test]
fn forwarded_bytes_return_credit_to_the_guest() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    let (mut client, port) = host_connection(&mut m, &path);
    let chunk = vec![9u8; (BUF_ALLOC / 2) as usize];
    for piece in chunk.chunks(MAX_PAYLOAD as usize) {
        send(&mut m, guest(op::RW, 52, port, 0, piece), piece);
    }
    let mut got = vec![0u8; chunk.len()];
    // Whatever the socket buffer took is forwarded; the rest on the next flush.
    client.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    let mut read = 0;
    let mut updates = Vec::new();
    while read < got.len() {
        read += client.read(&mut got[read..]).expect("read");
        updates.extend(drain(&mut m));
    }
    let last = updates.last().expect("a credit update").0;
    assert_eq!(last.op, op::CREDIT_UPDATE);
    assert_eq!(last.fwd_cnt, BUF_ALLOC / 2);
}

#[test]
fn a_guest_shutdown_ends_in_reset_after_its_data_reached_the_host() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    let (mut client, port) = host_connection(&mut m, &path);
    send(&mut m, guest(op::RW, 52, port, 0, b"bye"), b"bye");
    send(&mut m, guest(op::SHUTDOWN, 52, port, SHUTDOWN_RCV | SHUTDOWN_SEND, b""), b"");
    assert_eq!(ops(&drain(&mut m)), [op::RST]);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("read");
    assert_eq!(rest, b"bye");
    assert_eq!(m.connections(), 0);
}

#[test]
fn a_host_close_tells_the_guest_the_host_sends_no_more() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    let (client, port) = host_connection(&mut m, &path);
    drop(client);
    let packets = drain(&mut m);
    assert_eq!(ops(&packets), [op::SHUTDOWN]);
    assert_eq!(packets[0].0.flags, SHUTDOWN_SEND);
    assert!(drain(&mut m).is_empty(), "a closed stream does not wake the worker again");
    send(&mut m, guest(op::SHUTDOWN, 52, port, SHUTDOWN_RCV | SHUTDOWN_SEND, b""), b"");
    assert_eq!(ops(&drain(&mut m)), [op::RST]);
    assert_eq!(m.connections(), 0);
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    let clients: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let c = UnixStream::connect(&path).expect("connect");
            drain(&mut m);
            c
        })
        .collect();
    assert_eq!(m.connections(), MAX_CONNECTIONS);
    let mut extra = UnixStream::connect(&path).expect("connect");
    drain(&mut m);
    let mut buf = [0u8; 1];
    assert_eq!(extra.read(&mut buf).expect("read"), 0, "closed at once");
    send(&mut m, guest(op::REQUEST, 1, 1, 0, b""), b"");
    assert_eq!(ops(&drain(&mut m)), [op::RST], "a guest request too");
    drop(clients);
}

#[test]
fn packets_for_no_connection_are_reset_and_resets_never_answered() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    for kind in [op::RESPONSE, op::RW, op::SHUTDOWN, op::CREDIT_UPDATE, op::CREDIT_REQUEST, 0, 8, 0xffff] {
        send(&mut m, guest(kind, 5, 6, 0, b""), b"");
        assert_eq!(ops(&drain(&mut m)), [op::RST], "op {kind}");
    }
    send(&mut m, guest(op::RST, 5, 6, 0, b""), b"");
    assert!(drain(&mut m).is_empty());
    // Wrong addresses or type, or a length that is not the payload's.
    let mut h = guest(op::REQUEST, 5, 6, 0, b"");
    h.src_cid = 4;
    send(&mut m, h, b"");
    let mut h = guest(op::REQUEST, 5, 6, 0, b"");
    h.type_ = 2;
    send(&mut m, h, b"");
    let mut h = guest(op::RW, 5, 6, 0, b"");
    h.len = 3;
    send(&mut m, h, b"");
    assert_eq!(ops(&drain(&mut m)), [op::RST, op::RST, op::RST]);
}

#[test]
fn the_control_queue_is_bounded() {
    let path = socket_path();
    let mut m = Muxer::new(CID, &path).expect("muxer");
    for port in 0..(MAX_CONTROL as u32 * 2) {
        send(&mut m, guest(op::RW, port, 6, 0, b""), b"");
    }
    assert_eq!(drain(&mut m).len(), MAX_CONTROL);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Random headers and payloads, some addressed like real ones: never a
    /// panic, every answer an RST (there is no listener and no connection).
    #[test]
    fn random_packets_get_resets_and_never_a_panic(
        packets in proptest::collection::vec(
            (proptest::collection::vec(proptest::prelude::any::<u8>(), HEADER_LEN..HEADER_LEN + 16), 0u16..10, proptest::prelude::any::<bool>()),
            1..24,
        )
    ) {
        let path = socket_path();
        let mut m = Muxer::new(CID, &path).expect("muxer");
        for (bytes, kind, addressed) in packets {
            let mut h = Header::parse(&bytes).expect("header");
            let payload = &bytes[HEADER_LEN..];
            if addressed {
                h.src_cid = CID;
                h.dst_cid = HOST_CID;
                h.type_ = TYPE_STREAM;
                h.op = kind;
                h.len = payload.len() as u32;
            }
            m.handle_tx(&h, payload);
            for (answer, data) in drain(&mut m) {
                proptest::prop_assert_eq!(answer.op, op::RST);
                proptest::prop_assert!(data.is_empty());
                proptest::prop_assert_eq!((answer.src_port, answer.dst_port), (h.dst_port, h.src_port));
            }
        }
        proptest::prop_assert_eq!(m.connections(), 0);
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }
}
