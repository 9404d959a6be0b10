//! Raw sockets for abusive or hand-made traffic: upgrade heads, masked frames built with the
//! protocol crate, and a frame reader for what tungstenite refuses to produce or to read.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Instant,
};

use ringcast_protocol::{CloseCode, Codec, Event, OpCode};

use crate::DEADLINE;

/// A raw TCP connection with read and write deadlines.
pub fn raw(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    stream
}

/// Reads until the peer closes (a reset counts as closed); returns everything read. A read that
/// times out fails the test.
pub fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("read failed after {:?}: {e}", start.elapsed()),
        }
    }
}

/// A valid upgrade request head for `path`.
pub fn upgrade_request(path: &str) -> String {
    upgrade_request_with(path, &[])
}

/// A valid upgrade request head for `path` with extra header lines (`("Name", "value")`).
pub fn upgrade_request_with(path: &str, headers: &[(&str, &str)]) -> String {
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends a valid upgrade for `/` on a raw stream and reads the 101 head; returns any bytes after
/// it. Panics on any other answer.
pub fn raw_upgrade(stream: &mut TcpStream) -> Vec<u8> {
    stream.write_all(upgrade_request("/").as_bytes()).unwrap();
    read_101(stream, Vec::new())
}

/// Reads (starting with `got`) until the end of a response head; asserts it is a 101 and
/// returns the bytes after it.
fn read_101(stream: &mut TcpStream, mut got: Vec<u8>) -> Vec<u8> {
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(
                got.starts_with(b"HTTP/1.1 101"),
                "{}",
                String::from_utf8_lossy(&got)
            );
            return got.split_off(end + 4);
        }
        let n = stream.read(&mut buf).expect("read 101");
        assert!(
            n > 0,
            "closed before 101: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// A masked client frame.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    ringcast_protocol::encode_frame(
        &mut buf,
        fin,
        OpCode::from_u8(opcode).expect("opcode"),
        payload,
        Some([0x37, 0xfa, 0x21, 0x3d]),
    );
    buf.to_vec()
}

/// A client over a raw socket that frames with the protocol crate, for traffic tungstenite
/// refuses to produce (unmasked frames, reserved bits, bad UTF-8) and for subscribers that
/// stop reading on purpose and read everything later.
#[derive(Debug)]
pub struct RawClient {
    /// The socket, for writing raw bytes or changing its options.
    pub stream: TcpStream,
    codec: Codec,
    buf: bytes::BytesMut,
    upgraded: bool,
}

impl RawClient {
    /// Connects and upgrades to `/`.
    pub fn connect(addr: SocketAddr) -> Self {
        let mut stream = raw(addr);
        let rest = raw_upgrade(&mut stream);
        Self {
            stream,
            codec: Codec::client(Default::default(), 99),
            buf: bytes::BytesMut::from(&rest[..]),
            upgraded: true,
        }
    }

    /// Connects and upgrades to `/`, offering permessage-deflate as `offer` says; returns the
    /// client (its codec compresses and inflates as agreed) and the parameters the server
    /// agreed to (`None`: declined).
    pub fn connect_deflate(
        addr: SocketAddr,
        offer: ringcast_protocol::deflate::DeflateConfig,
    ) -> (Self, Option<ringcast_protocol::deflate::DeflateParams>) {
        let mut stream = raw(addr);
        let hs = ringcast_protocol::ClientHandshake::new([5; 16], &[]).with_deflate(offer);
        stream
            .write_all(&hs.request("localhost", "/", &[]))
            .expect("write upgrade");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let end = loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = stream.read(&mut buf).expect("read 101");
            assert!(n > 0, "closed before 101");
            got.extend_from_slice(&buf[..n]);
        };
        let (_, params) = hs
            .check_response_deflate(&got[..end])
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&got[..end])));
        let mut codec = Codec::client(Default::default(), 7);
        if let Some(p) = params {
            codec = codec.with_deflate(p, &offer);
        }
        let client = Self {
            stream,
            codec,
            buf: bytes::BytesMut::from(&got[end..]),
            upgraded: true,
        };
        (client, params)
    }

    /// Sends a whole message as one frame, compressed when permessage-deflate was agreed and
    /// the message reaches the offer's threshold.
    pub fn send_message(&mut self, opcode: OpCode, payload: &[u8]) {
        let mut out = bytes::BytesMut::new();
        self.codec.encode_message(opcode, payload, &mut out);
        self.send_raw(&out);
    }

    /// Wraps a stream that has sent its upgrade request (and maybe frames after it) without
    /// reading the answer yet: the 101 is read and checked on the first read.
    pub fn after_upgrade_sent(stream: TcpStream) -> Self {
        Self {
            stream,
            codec: Codec::client(Default::default(), 1),
            buf: bytes::BytesMut::new(),
            upgraded: false,
        }
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Sends one masked frame.
    pub fn send_frame(&mut self, opcode: u8, fin: bool, payload: &[u8]) {
        self.send_raw(&client_frame(opcode, fin, payload));
    }

    /// The next event from the server, or `None` once it closed the TCP connection.
    pub fn next_event(&mut self) -> Option<Event> {
        if !self.upgraded {
            let rest = read_101(&mut self.stream, self.buf.split().to_vec());
            self.buf.extend_from_slice(&rest);
            self.upgraded = true;
        }
        self.read_event()
            .unwrap_or_else(|e| panic!("read failed: {e}"))
    }

    /// The next event from the server, or `None` when the read timeout the caller set on
    /// [`RawClient::stream`] passes first (for a test that polls several connections in
    /// turn). Panics if the server closed the TCP connection or the read failed otherwise.
    pub fn try_next_event(&mut self) -> Option<Event> {
        assert!(self.upgraded, "connected with RawClient::connect");
        match self.read_event() {
            Ok(Some(ev)) => Some(ev),
            Ok(None) => panic!("the server closed the connection"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// Decodes buffered bytes, reading more until the codec yields an event: `Ok(None)` once
    /// the server closed TCP (a reset counts), `Err` for any other read error.
    fn read_event(&mut self) -> std::io::Result<Option<Event>> {
        let mut chunk = [0u8; 65536];
        loop {
            match self.codec.poll_event(&mut self.buf) {
                Ok(Some(ev)) => return Ok(Some(ev)),
                Ok(None) => {}
                Err(e) => panic!("server broke the protocol: {e}"),
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// The next data message's payload (pings and pongs skipped), or the close code.
    pub fn next_data(&mut self) -> Result<Vec<u8>, CloseCode> {
        loop {
            match self.next_event() {
                Some(Event::Text(t)) => return Ok(t.as_bytes().to_vec()),
                Some(Event::Binary(b)) => return Ok(b.to_vec()),
                Some(Event::Close(c)) => return Err(c.map_or(CloseCode::NO_STATUS, |c| c.code)),
                Some(_) => continue,
                None => panic!("closed without a close frame"),
            }
        }
    }

    /// Reads until the server's close frame; returns its code and reason. Then expects the
    /// server to close the TCP connection with nothing after the frame.
    pub fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.next_event() {
                Some(Event::Close(frame)) => {
                    let frame = frame.expect("close frame with a code");
                    let rest = read_to_close(&mut self.stream);
                    assert!(rest.is_empty(), "bytes after the close frame: {rest:?}");
                    return (frame.code.as_u16(), frame.reason.to_string());
                }
                Some(_) => continue,
                None => panic!("connection closed without a close frame"),
            }
        }
    }
}
