//! Frames on a template's control connection: those of the worker protocol (u32
//! big-endian length, then JSON), with a descriptor attached when one travels
//! (`SCM_RIGHTS`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::UnixStream;

/// `payload` as a frame.
pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 4);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Reads one frame and the descriptor that came with it, if any.
pub(crate) async fn read_frame_with_fd(
    stream: &mut UnixStream,
) -> std::io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut head = [0u8; 4];
    let mut got = 0;
    let mut fd = None;
    while got < head.len() {
        stream.readable().await?;
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let read = stream.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(&mut head[got..])];
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        fds.extend(received);
                    }
                }
            }
            Ok((msg.bytes, fds))
        });
        match read {
            Ok((0, _)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok((n, fds)) => {
                got += n;
                for raw in fds {
                    // SAFETY: the kernel just installed this descriptor for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok((read_payload(stream, head).await?, fd))
}

/// Sends one frame with `fd` attached.
pub(crate) async fn send_with_fd(
    stream: &UnixStream,
    payload: &[u8],
    fd: RawFd,
) -> std::io::Result<()> {
    let frame = frame(payload);
    let fds = [fd];
    let mut sent = 0;
    while sent < frame.len() {
        stream.writable().await?;
        let rights = [ControlMessage::ScmRights(&fds)];
        // The descriptor travels with the first bytes only.
        let cmsgs: &[ControlMessage] = if sent == 0 { &rights } else { &[] };
        match stream.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[IoSlice::new(&frame[sent..])],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one frame's payload.
pub(crate) async fn read_frame(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    read_payload(stream, head).await
}

/// Reads the payload of the frame whose length prefix is `head`.
async fn read_payload(stream: &mut UnixStream, head: [u8; 4]) -> std::io::Result<Vec<u8>> {
    let len = u32::from_be_bytes(head) as usize;
    if len > 1 << 20 {
        return Err(std::io::Error::other(format!("a {len}-byte frame")));
    }
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).await?;
    Ok(payload)
}
