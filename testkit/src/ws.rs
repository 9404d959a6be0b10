//! WebSocket clients (tungstenite over a blocking socket) with read and write deadlines.

use std::net::{SocketAddr, TcpStream};

use tungstenite::{client::IntoClientRequest, stream::MaybeTlsStream, WebSocket};

use crate::DEADLINE;

/// A tungstenite client over a plain TCP socket.
pub type Client = WebSocket<MaybeTlsStream<TcpStream>>;

/// The response to an upgrade request.
pub type Response = tungstenite::handshake::client::Response;

/// Connects to `ws://addr/path` with read and write deadlines, so no test can hang; panics if
/// the upgrade fails.
pub fn connect(addr: SocketAddr, path: &str) -> Client {
    match connect_with(addr, path, &[]) {
        Ok((ws, _)) => ws,
        Err(e) => panic!("upgrade to ws://{addr}{path} failed: {e}"),
    }
}

/// Connects with extra request headers; returns the response too, or the error (an HTTP
/// refusal is `tungstenite::Error::Http`; see [`refused`]).
pub fn connect_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, Response), tungstenite::Error> {
    let mut request = format!("ws://{addr}{path}").into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            value.parse().expect("header value"),
        );
    }
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.set_write_timeout(Some(DEADLINE))?;
    tungstenite::client(request, MaybeTlsStream::Plain(stream)).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => panic!("blocking handshake interrupted"),
    })
}

/// The HTTP status of a refused upgrade, with its response; panics if it was accepted or
/// failed any other way (a connect error is not a refusal).
pub fn refused(
    result: Result<(Client, Response), tungstenite::Error>,
) -> (u16, tungstenite::http::Response<Option<Vec<u8>>>) {
    match result {
        Err(tungstenite::Error::Http(response)) => (response.status().as_u16(), *response),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, the upgrade was accepted"),
    }
}

/// Reads until the server's close frame and returns its code and reason; panics on anything
/// else than data frames before it (which are skipped), or on a close without a frame.
pub fn expect_close(ws: &mut Client) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(Some(frame))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Ok(tungstenite::Message::Close(None)) => panic!("a close frame without a code"),
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}
