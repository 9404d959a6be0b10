//! Sockets for the benchmarks: the target URL, listeners for the peer servers, and client
//! sockets bound to a chosen loopback source address.
//!
//! Owns the loopback-only rule: a [`Target`] must resolve to an address in 127.0.0.0/8, so no
//! load from this crate leaves the machine. One source address has about 28,000 ephemeral
//! ports, so clients are spread over 127.0.0.2, 127.0.0.3, ... ([`SourceAddrs`]).

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, ToSocketAddrs},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Where the load goes: a loopback address plus the `Host` header and request target of the
/// WebSocket upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The server's address, always IPv4 loopback.
    pub addr: SocketAddrV4,
    /// The `Host` header value (`host:port` as written in the URL).
    pub host: String,
    /// The request target: path and query, starting with `/`.
    pub path: String,
}

impl Target {
    /// Parses `ws://HOST:PORT/PATH` (or `tcp://HOST:PORT` for raw TCP). The path defaults to
    /// `/`, the port to 80.
    ///
    /// # Errors
    /// Another scheme, an unresolvable host, or an address outside 127.0.0.0/8.
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("tcp://"))
            .with_context(|| format!("{url}: only ws:// (or tcp:// for raw) URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        ensure!(!authority.is_empty(), "{url}: no host");
        let with_port = if authority.rsplit_once(':').is_some() {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .with_context(|| format!("resolving {authority}"))?
            .find_map(|a| match a {
                SocketAddr::V4(v4) if v4.ip().is_loopback() => Some(v4),
                _ => None,
            })
            .with_context(|| format!("{url}: the load generator only targets 127.0.0.0/8"))?;
        Ok(Self {
            addr,
            host: authority.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// Hands out loopback source addresses: connection `i` gets
/// `127.0.0.(first + i / per_addr)`.
///
/// Worker parts carry it flattened as `first_source` and `per_addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceAddrs {
    /// Last octet of the first source address (2 gives 127.0.0.2).
    #[serde(rename = "first_source")]
    pub first: u8,
    /// Connections per source address, below the ~28,000 ephemeral ports one address has.
    pub per_addr: usize,
}

impl Default for SourceAddrs {
    fn default() -> Self {
        Self {
            first: 2,
            per_addr: 20_000,
        }
    }
}

impl SourceAddrs {
    /// The source address of connection `index`.
    ///
    /// # Errors
    /// The index would need an address past 127.0.0.254.
    pub fn for_index(&self, index: usize) -> Result<Ipv4Addr> {
        let octet = usize::from(self.first) + index / self.per_addr.max(1);
        match u8::try_from(octet) {
            Ok(o) if o < 255 => Ok(Ipv4Addr::new(127, 0, 0, o)),
            _ => bail!("connection {index} needs a source address past 127.0.0.254"),
        }
    }
}

/// Opens a blocking TCP connection from `source` (port chosen by the kernel at connect time) to
/// `dest`, with `TCP_NODELAY` set.
///
/// The socket sets `IP_BIND_ADDRESS_NO_PORT`, so the ephemeral port is picked per 4-tuple when
/// connecting rather than reserved globally at bind time: runs against different server ports
/// never compete for ports, and ports in `TIME_WAIT` from an earlier run can be reused.
///
/// # Errors
/// The socket cannot be made or bound, or the connection fails or takes longer than `timeout`.
pub fn connect_from(
    source: Ipv4Addr,
    dest: SocketAddrV4,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    set_bind_address_no_port(&socket)?;
    socket.bind(&SockAddr::from(SocketAddrV4::new(source, 0)))?;
    socket.connect_timeout(&SockAddr::from(dest), timeout)?;
    socket.set_nodelay(true)?;
    Ok(socket.into())
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` on `socket`, see [`connect_from`].
///
/// # Errors
/// The kernel refuses the option.
pub(crate) fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is a live socket owned by `socket`; the option value is a c_int that
    // outlives the call, and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The listen backlog the peer servers ask for; the kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: i32 = 4096;

/// A non-blocking listener on `addr` with `SO_REUSEADDR` and a [`LISTEN_BACKLOG`] backlog, for
/// a runtime to adopt (`from_std`).
///
/// # Errors
/// The address cannot be bound.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_address_host_and_path() {
        let t = Target::parse("ws://127.0.0.1:9000/echo?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:9000");
        assert_eq!(t.path, "/echo?x=1");
        let t = Target::parse("tcp://localhost:9001").unwrap();
        assert_eq!(t.addr.port(), 9001);
        assert_eq!(t.path, "/");
    }

    #[test]
    fn non_loopback_targets_are_refused() {
        assert!(Target::parse("ws://10.0.0.1:80/").is_err());
        assert!(Target::parse("http://127.0.0.1:80/").is_err());
    }

    #[test]
    fn source_addresses_travel_to_workers_as_first_source_and_per_addr() {
        let sources = SourceAddrs {
            first: 3,
            per_addr: 10,
        };
        let json = serde_json::to_value(sources).unwrap();
        assert_eq!(json, serde_json::json!({"first_source": 3, "per_addr": 10}));
        assert_eq!(
            serde_json::from_value::<SourceAddrs>(json).unwrap(),
            sources
        );
    }

    #[test]
    fn source_addresses_advance_every_per_addr_connections() {
        let s = SourceAddrs {
            first: 2,
            per_addr: 10,
        };
        assert_eq!(s.for_index(0).unwrap(), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(s.for_index(9).unwrap(), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(s.for_index(10).unwrap(), Ipv4Addr::new(127, 0, 0, 3));
        assert!(s.for_index(10 * 253).is_err());
    }

    #[test]
    fn a_client_connects_from_the_chosen_source() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let SocketAddr::V4(dest) = listener.local_addr().unwrap() else {
            panic!("IPv4 listener")
        };
        let source = Ipv4Addr::new(127, 0, 0, 3);
        let stream = connect_from(source, dest, Duration::from_secs(5)).unwrap();
        assert_eq!(stream.local_addr().unwrap().ip(), source);
    }
}
