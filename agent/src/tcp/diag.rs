//! The kernel's own list of TCP sockets, through netlink `sock_diag`
//! (what `ss` reads), filtered by state in the kernel: the ground truth for
//! "TIME_WAIT now", the listening ports of the targets and their established
//! connections.

use std::net::IpAddr;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// Errors of the sock_diag layer.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// The netlink socket failed.
    #[error("sock_diag netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// The kernel answered something we cannot decode.
    #[error("decoding a sock_diag answer: {0}")]
    Decode(String),
}

/// A connection's addresses: IPv4 as IPv4-mapped IPv6 (as the
/// `inet_sock_set_state` tracepoint stores them), so kernel events and
/// sock_diag answers compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    /// `AF_INET` or `AF_INET6` of the socket.
    pub family: u8,
    /// Local address.
    pub local: [u8; 16],
    /// Local port.
    pub local_port: u16,
    /// Remote address.
    pub remote: [u8; 16],
    /// Remote port.
    pub remote_port: u16,
}

/// IPv4-mapped (`::ffff:a.b.c.d`) for IPv4, as is for IPv6.
pub fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// One socket of a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket {
    /// Its addresses.
    pub tuple: Tuple,
    /// State as sock_diag reports it (a TIME_WAIT socket shows its
    /// sub-state: TIME_WAIT, or FIN_WAIT2 before the peer's FIN).
    pub state: u8,
    /// Inode of the socket (0 for TIME_WAIT sockets: no file).
    pub inode: u32,
    /// Unread bytes (established), or connections waiting to be accepted
    /// (listening): what /proc/net/tcp calls `rx_queue`.
    pub recv_queue: u32,
}

/// A `NETLINK_SOCK_DIAG` socket.
pub struct SockDiag {
    socket: Socket,
    buf: Vec<u8>,
    seq: u32,
}

/// Receive buffer: the kernel fills dump messages up to 32 KiB
/// (netlink_dump(), net/netlink/af_netlink.c); twice that never truncates.
const RECV_BUF: usize = 64 * 1024;

impl SockDiag {
    /// Opens the netlink socket.
    pub fn open() -> Result<Self, DiagError> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            buf: vec![0; RECV_BUF],
            seq: 0,
        })
    }

    /// Every TCP socket (IPv4 and IPv6) in one of `states`.
    pub fn dump(&mut self, states: StateFlags) -> Result<Vec<DiagSocket>, DiagError> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            self.dump_family(family, states.clone(), &mut out)?;
        }
        Ok(out)
    }

    fn dump_family(
        &mut self,
        family: u8,
        states: StateFlags,
        out: &mut Vec<DiagSocket>,
    ) -> Result<(), DiagError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states,
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            })
            .into(),
        );
        packet.finalize();
        let mut request = vec![0; packet.buffer_len()];
        packet.serialize(&mut request);
        self.socket.send(&request, 0)?;

        loop {
            let size = self.socket.recv(&mut &mut self.buf[..], 0)?;
            if size == 0 {
                return Err(DiagError::Decode("empty netlink answer".into()));
            }
            let mut offset = 0;
            while offset < size {
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf[offset..size])
                    .map_err(|e| DiagError::Decode(e.to_string()))?;
                let len = message.header.length as usize;
                match message.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(DiagError::Io(e.to_io()));
                    }
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        let h = &response.header;
                        out.push(DiagSocket {
                            tuple: Tuple {
                                family: h.family,
                                local: mapped(h.socket_id.source_address),
                                local_port: h.socket_id.source_port,
                                remote: mapped(h.socket_id.destination_address),
                                remote_port: h.socket_id.destination_port,
                            },
                            state: h.state,
                            inode: h.inode,
                            recv_queue: h.recv_queue,
                        });
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

/// The socket inodes a process holds open (`socket:[N]` links in
/// /proc/PID/fd). Empty when the process is gone.
pub fn socket_inodes(pid: u32) -> std::collections::HashSet<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Default::default();
    };
    dir.filter_map(|e| {
        let link = std::fs::read_link(e.ok()?.path()).ok()?;
        parse_socket_link(link.to_str()?)
    })
    .collect()
}

/// `socket:[12345]` → 12345.
pub fn parse_socket_link(link: &str) -> Option<u32> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// Test that IPv4 addresses are mapped as the tracepoint stores them.
    #[test]
    fn v4_is_mapped() {
        let m = mapped(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(m, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!(
            mapped(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            Ipv6Addr::LOCALHOST.octets()
        );
    }

    /// Test that socket links of /proc/PID/fd are parsed, other links not.
    #[test]
    fn socket_links() {
        assert_eq!(parse_socket_link("socket:[4242]"), Some(4242));
        assert_eq!(parse_socket_link("pipe:[4242]"), None);
        assert_eq!(parse_socket_link("/dev/null"), None);
    }
}
