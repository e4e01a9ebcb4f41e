//! UDP sockets for QUIC endpoints, with kernel buffers large enough for fat links.
//!
//! Linux gives a UDP socket about 208 KiB of receive buffer by default: under 2 ms of traffic at
//! 1 Gbit/s. A receiver that is descheduled for longer (a busy two-core machine, a stager
//! writing its store) loses datagrams in the kernel, where nobody counts them, and the sender
//! retransmits them, so the link carries the bytes twice. Every mesh endpoint therefore asks
//! for [`SOCKET_BUFFER_BYTES`] of receive and send buffer.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Receive and send buffer asked for each socket, in bytes: about 30 ms at 1 Gbit/s.
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Binds a UDP socket on `addr` and enlarges its buffers with [`enlarge_buffers`].
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    enlarge_buffers(&socket, SOCKET_BUFFER_BYTES);
    Ok(socket)
}

/// Asks for `bytes` of receive and send buffer on `socket`. The kernel caps `SO_RCVBUF` and
/// `SO_SNDBUF` at `net.core.rmem_max` / `wmem_max`; when that leaves less than asked, a process
/// with `CAP_NET_ADMIN` (a daemon running as root) gets the full size through the `FORCE`
/// variants. Whatever is refused leaves a smaller buffer, which still works, with less slack:
/// it is logged at debug level, never an error.
pub fn enlarge_buffers(socket: &UdpSocket, bytes: usize) {
    let wanted = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (option, force, name) in [
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE, "receive"),
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE, "send"),
    ] {
        if let Err(error) = set_int(socket, option, wanted) {
            tracing::debug!(%error, buffer = name, "cannot enlarge a UDP socket buffer");
        }
        // Linux reports twice the size asked (the other half is its bookkeeping).
        if get_int(socket, option).is_ok_and(|got| got / 2 >= wanted) {
            continue;
        }
        if let Err(error) = set_int(socket, force, wanted) {
            tracing::debug!(
                %error,
                buffer = name,
                "UDP socket buffer capped by net.core.{}mem_max",
                if option == libc::SO_RCVBUF { "r" } else { "w" }
            );
        }
    }
}

fn set_int(socket: &UdpSocket, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt(2) on a socket we own, reading a c_int that lives across the call.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_int(socket: &UdpSocket, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) on a socket we own, writing at most `len` bytes into `value`.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    if result == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_socket_gets_more_than_the_default_receive_buffer() {
        let socket = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind on loopback");
        let got = get_int(&socket, libc::SO_RCVBUF).expect("read SO_RCVBUF");
        // The kernel default is 212,992 (reported as is); anything enlarged reports twice the
        // size granted. Where rmem_max is the default and the process has no CAP_NET_ADMIN the
        // size stays near the default, which this test then cannot tell from a failure.
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        if rmem_max >= SOCKET_BUFFER_BYTES {
            assert!(
                got as usize >= 2 * SOCKET_BUFFER_BYTES,
                "receive buffer {got} B with rmem_max {rmem_max}"
            );
        } else {
            assert!(got > 0, "receive buffer {got} B");
        }
    }
}
