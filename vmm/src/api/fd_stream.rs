//! The API connection read with `recvmsg`, so that descriptors a client sends
//! as `SCM_RIGHTS` (Cloud Hypervisor's `vm.add-net` with TAP fds, as Kata and
//! `ch-remote add-net fd=[...]` do) are kept for the request they came with.
//! Descriptors arrive with the first bytes of the request, so they sit in the
//! connection's stash before its handler runs; the handler takes them, and
//! whatever it does not use is closed when it drops them.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, recvmsg};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

/// At most this many descriptors per request; more make the request fail
/// (and are closed), so a client cannot fill the VMM's descriptor table.
pub const MAX_FDS: usize = 16;

/// Descriptors received on one connection and not yet taken by a request.
#[derive(Debug, Default)]
pub struct ReceivedFds {
    pub fds: Vec<OwnedFd>,
    /// More than `MAX_FDS` arrived (the rest were closed).
    pub overflow: bool,
}

impl ReceivedFds {
    fn add(&mut self, fds: impl Iterator<Item = OwnedFd>) {
        for fd in fds {
            if self.fds.len() < MAX_FDS {
                self.fds.push(fd);
            } else {
                self.overflow = true;
            }
        }
    }
}

pub type FdStash = Arc<Mutex<ReceivedFds>>;

/// Takes every descriptor received so far on the connection.
pub fn take(stash: &FdStash) -> ReceivedFds {
    std::mem::take(&mut *stash.lock().unwrap_or_else(|p| p.into_inner()))
}

pub struct FdStream {
    inner: UnixStream,
    stash: FdStash,
}

impl FdStream {
    pub fn new(inner: UnixStream, stash: FdStash) -> Self {
        FdStream { inner, stash }
    }
}

/// One `recvmsg` into `buf`; descriptors go to `stash`.
fn receive(socket: impl AsFd, buf: &mut [u8], stash: &FdStash) -> std::io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let flags = RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT;
    let message = recvmsg(socket, &mut [IoSliceMut::new(buf)], &mut control, flags)?;
    let mut received = stash.lock().unwrap_or_else(|p| p.into_inner());
    for item in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = item {
            received.add(fds);
        }
    }
    // The kernel closes what did not fit in `space`.
    if message.flags.contains(ReturnFlags::CTRUNC) {
        received.overflow = true;
    }
    Ok(message.bytes)
}

/// Whether bytes wait behind what `recvmsg` returned. A read stops where
/// descriptors were attached (ch-remote sends its request line with the
/// descriptors, then the rest in plain writes), so a short read does not mean
/// the socket is drained, and the rest, already queued, brings no new
/// readiness. A half-close (0 bytes) counts as nothing queued.
fn more_queued(socket: impl AsFd) -> bool {
    let mut byte = [MaybeUninit::uninit(); 1];
    matches!(rustix::net::recv(socket, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT), Ok((_, n)) if n > 0)
}

impl AsyncRead for FdStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            match this.inner.try_io(Interest::READABLE, || receive(&this.inner, unfilled, &this.stash)) {
                Ok(n) => {
                    if n > 0 && n < room && !more_queued(&this.inner) {
                        // A short read drained the socket: forget the readiness
                        // until epoll reports more, as tokio's own stream does.
                        // (The API runs on one current-thread runtime: no
                        // readiness is recorded between this read and the
                        // clearing, and bytes that arrive later bring a new
                        // event.)
                        // Otherwise the next read finds a client's half-close
                        // (`shutdown(SHUT_WR)` after its request) at once, and
                        // hyper drops the connection before answering.
                        let drained = || Err::<(), _>(std::io::Error::from(std::io::ErrorKind::WouldBlock));
                        let _ = this.inner.try_io(Interest::READABLE, drained);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;
    use std::os::fd::AsRawFd;

    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};

    use super::*;

    fn send_with_fds(socket: &std::os::unix::net::UnixStream, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        sendmsg(socket, &[IoSlice::new(bytes)], &mut control, SendFlags::empty()).expect("sendmsg");
    }

    async fn read_exact(stream: &mut FdStream, n: usize) -> Vec<u8> {
        let mut data = vec![0u8; n];
        let mut filled = 0;
        while filled < n {
            let mut buf = ReadBuf::new(&mut data[filled..]);
            std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_read(cx, &mut buf)).await.expect("read");
            assert!(!buf.filled().is_empty(), "end of stream");
            filled += buf.filled().len();
        }
        data
    }

    /// Runs `test` with a connected pair: the client end and our stream over the server end.
    fn with_pair(test: impl AsyncFnOnce(std::os::unix::net::UnixStream, FdStream, FdStash)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let (client, server) = std::os::unix::net::UnixStream::pair().expect("pair");
            server.set_nonblocking(true).expect("nonblocking");
            let server = UnixStream::from_std(server).expect("tokio stream");
            let stash = FdStash::default();
            test(client, FdStream::new(server, stash.clone()), stash).await;
        });
    }

    #[test]
    fn descriptors_sent_with_the_bytes_are_stashed_for_the_request() {
        with_pair(async |client, mut stream, stash| {
            let file = std::fs::File::open("/dev/null").expect("open");
            send_with_fds(&client, b"PUT", &[file.as_fd(), file.as_fd()]);
            assert_eq!(read_exact(&mut stream, 3).await, b"PUT");
            let received = take(&stash);
            assert_eq!(received.fds.len(), 2);
            assert!(!received.overflow);
            assert_ne!(received.fds[0].as_raw_fd(), file.as_raw_fd(), "our own duplicates");
            assert!(take(&stash).fds.is_empty(), "taken once");
        });
    }

    #[test]
    fn more_descriptors_than_the_cap_mark_the_request_and_are_not_kept() {
        with_pair(async |client, mut stream, stash| {
            let file = std::fs::File::open("/dev/null").expect("open");
            let many: Vec<_> = (0..MAX_FDS + 1).map(|_| file.as_fd()).collect();
            send_with_fds(&client, b"x", &many);
            read_exact(&mut stream, 1).await;
            let received = take(&stash);
            assert!(received.overflow);
            assert!(received.fds.len() <= MAX_FDS);
        });
    }

    /// ch-remote's `add-net fd=[..]`: the request line carries the
    /// descriptors, the rest follows in plain writes, all queued before the
    /// VMM reads. A read stops at the descriptors' boundary; the rest must be
    /// read without waiting for readiness that will not come again.
    #[test]
    fn bytes_queued_behind_descriptors_are_read_without_new_readiness() {
        with_pair(async |client, mut stream, stash| {
            use std::io::Write;
            let file = std::fs::File::open("/dev/null").expect("open");
            send_with_fds(&client, b"PUT /x HTTP/1.1\r\n", &[file.as_fd()]);
            (&client).write_all(b"Content-Length: 0\r\n\r\n").expect("write");
            let total = b"PUT /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n".len();
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                let mut data = vec![0u8; 256];
                let mut filled = 0;
                while filled < total {
                    let mut buf = ReadBuf::new(&mut data[filled..]);
                    std::future::poll_fn(|cx| Pin::new(&mut stream).poll_read(cx, &mut buf)).await.expect("read");
                    filled += buf.filled().len();
                }
                data.truncate(filled);
                data
            })
            .await
            .expect("the queued rest is read at once");
            assert_eq!(read, b"PUT /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
            assert_eq!(take(&stash).fds.len(), 1);
        });
    }
}
